"""python -m model.hf import: local Llama directories (transformers' own, with a `tokenizers` BPE in its own
id order) become run directories whose model computes their logits, and which SFT fine-tunes;
our own exports come back bit for bit; what we cannot represent is refused, naming the field."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from tritongpt import kernels
from model.chat_format import SPECIALS
from model.io.checkpoint import load_model, load_tokenizer
from model.tokenizer import SPLIT_PATTERN
from train import sft

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from model.io import hf  # noqa: E402
from model.io import hf_tokenizer  # noqa: E402
from model.command import run_command  # noqa: E402
from hf_fixtures import make_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
SOURCES = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")))
TEXT = Path(SOURCES[0]).read_text(encoding="utf-8")[:2000] + " Ünïcödé 日本語 😀 12345\n"


@pytest.fixture(autouse=True)
def _torch_kernels():
    with kernels.use("torch"):
        yield


@lru_cache(maxsize=None)
def hf_tokenizer_json(split: bool, chat: bool) -> str:
    """A byte-level BPE trained by `tokenizers` itself: special tokens first, the byte alphabet in
    its table order, so its ids are not ours. split: our regex then ByteLevel; else GPT-2's ByteLevel."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), "isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
                         if split else pre_tokenizers.ByteLevel(add_prefix_space=False))
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", *(SPECIALS if chat else ())]
    tok.train(SOURCES, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


def llama_dir(path: Path, tied: bool, kv_heads: int, split: bool = True, chat: bool = False,
              extra_rows: int = 0, **config) -> tuple[Path, object]:
    """A random transformers LlamaForCausalLM saved with its tokenizer.json (odd sizes, init 0.1)."""
    tok_json = hf_tokenizer_json(split, chat)
    n_vocab = tokenizers.Tokenizer.from_str(tok_json).get_vocab_size()
    cfg = transformers.LlamaConfig(vocab_size=n_vocab + extra_rows, hidden_size=96, intermediate_size=200,
                                   num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=kv_heads,
                                   max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
                                   tie_word_embeddings=tied, **config)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    return path, model


@pytest.mark.parametrize("tied,kv_heads,split,chat,extra_rows", [
    (True, 2, True, False, 0),     # GQA, tied, our split pattern, no chat tokens
    (False, 6, False, True, 0),    # MHA, untied, GPT-2's ByteLevel, chat tokens present
    (False, 3, True, False, 5),    # padded embedding rows past the tokenizer
])
def test_imported_model_computes_transformers_logits(tmp_path, tied, kv_heads, split, chat, extra_rows):
    src, theirs = llama_dir(tmp_path / "hf", tied, kv_heads, split, chat, extra_rows)
    run = hf.import_llama(src, tmp_path / "run")
    ours, state = load_model(run)
    tok = load_tokenizer(run)
    assert ours.cfg.tie_embeddings == tied and ours.cfg.n_kv_head == kv_heads
    assert all(s in tok.special_tokens for s in SPECIALS)              # added when missing
    assert ours.cfg.vocab_size == theirs.config.vocab_size + (0 if chat else len(SPECIALS))
    their_ids = tokenizers.Tokenizer.from_str(hf_tokenizer_json(split, chat)).encode(TEXT).ids[:120]
    our_ids = tok.encode(TEXT)[:120]
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor([their_ids])).logits[0]              # (T, V) in their id order
        got = ours.eval()(torch.tensor([our_ids]))[0]
    mapping = hf_tokenizer.from_tokenizer_json(json.loads(hf_tokenizer_json(split, chat)))[1]
    columns = torch.tensor([mapping[i] for i in range(len(mapping))])
    assert len(our_ids) == len(their_ids) and got.std() > 0.5
    assert (got[:, columns] - ref[:, :len(mapping)]).abs().max().item() <= 1e-4


def test_round_trip_is_bit_identical(tmp_path):
    from hf_fixtures import make_run
    model = make_run(tmp_path / "run", trained=True)
    first = hf.export(tmp_path / "run", tmp_path / "exp1")
    hf.import_llama(first, tmp_path / "imported")
    second = hf.export(tmp_path / "imported", tmp_path / "exp2")
    from safetensors.torch import load_file
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back, _ = load_model(tmp_path / "imported")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


def test_an_imported_model_fine_tunes(tmp_path):
    src, _ = llama_dir(tmp_path / "hf", tied=False, kv_heads=2)
    run = hf.import_llama(src, tmp_path / "run")
    result = sft.main(["--init", str(run), "--out", str(tmp_path / "sft"), "--max-steps", "1", "--device", "cpu",
                       "--batch-size", "4", "--n-train", "16", "--eval-examples", "4", "--eval-interval", "0"])
    assert result["step"] == 1 and (tmp_path / "sft" / "checkpoints" / "latest").exists()


def test_an_imported_model_continues_pretraining_on_its_own_tokenizer(tmp_path):
    from corpus_fixtures import write_corpus
    from train import pretrain
    from train.data.prepare import PreparedData
    src, _ = llama_dir(tmp_path / "hf", tied=True, kv_heads=2)
    run = hf.import_llama(src, tmp_path / "run")
    corpus = write_corpus(tmp_path / "corpus", n_files=20)
    common = ["--max-steps", "2", "--batch-size", "2", "--eval-interval", "0", "--eval-tokens", "512", "--device",
              "cpu", "--data-dir", str(tmp_path / "data"), "--init", str(run)]
    result = pretrain.main(["--data", str(corpus), "--out", str(tmp_path / "more"), *common])
    assert result["step"] == 2
    prepared = next((tmp_path / "data").iterdir())
    assert PreparedData(prepared).tokenizer.fingerprint == load_tokenizer(run).fingerprint
    other = prepare_with_its_own_tokenizer(corpus, tmp_path / "other")
    with pytest.raises(ValueError, match="was tokenized with tokenizer"):
        pretrain.main(["--data", str(other), "--out", str(tmp_path / "again"), *common])


def prepare_with_its_own_tokenizer(corpus: Path, out: Path) -> Path:
    from train.data.prepare import prepare
    return prepare(str(corpus), out=out, vocab_size=300, verbose=False)


def test_llama3_rope_scaling_is_read(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    src, theirs = llama_dir(tmp_path / "hf", tied=True, kv_heads=2, chat=True, rope_parameters={
        **scaling, "rope_theta": 500000.0})
    ours, _ = load_model(hf.import_llama(src, tmp_path / "run"))
    assert ours.cfg.rope_scaling == scaling and ours.cfg.rope_theta == 500000.0
    mapping = hf_tokenizer.from_tokenizer_json(json.loads(hf_tokenizer_json(True, True)))[1]
    inverse = {v: k for k, v in mapping.items()}
    ids = torch.randint(0, len(mapping), (1, 100))
    with torch.no_grad():
        got = ours.eval()(ids)[0]
        ref = theirs(input_ids=torch.tensor([[inverse[int(i)] for i in ids[0]]])).logits[0]
    assert (got[:, [mapping[i] for i in range(len(mapping))]] - ref).abs().max().item() <= 1e-4


def _break(path: Path, what: str) -> None:
    config = json.loads((path / "config.json").read_text())
    if what in ("architectures", "attention_bias", "hidden_act", "rope"):
        config.update({"architectures": ["MistralForCausalLM"], "model_type": "mistral"} if what == "architectures"
                      else {"attention_bias": True} if what == "attention_bias"
                      else {"hidden_act": "gelu"} if what == "hidden_act"
                      else {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}})
        (path / "config.json").write_text(json.dumps(config))
    elif what == "config.json":
        (path / "config.json").unlink()
    elif what in ("missing tensor", "shape", "bias tensor"):
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(path / "model.safetensors"))
        if what == "missing tensor":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        elif what == "shape":
            tensors["model.norm.weight"] = torch.ones(95)
        else:
            tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(96)
        save_file(tensors, str(path / "model.safetensors"))
    else:
        doc = json.loads((path / "tokenizer.json").read_text())
        doc["normalizer"] = {"type": "NFC"}
        (path / "tokenizer.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("what,message", [
    ("config.json", "config.json is missing"),
    ("architectures", "is not LlamaForCausalLM"),
    ("attention_bias", "attention_bias is true"),
    ("hidden_act", "hidden_act 'gelu'"),
    ("rope", "rope scaling 'yarn' is not supported"),
    ("missing tensor", r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"),
    ("shape", r"model.norm.weight has shape \(95,\)"),
    ("bias tensor", "q_proj.bias"),
    ("tokenizer", "tokenizer.json: normalizer 'NFC'"),
])
def test_refusals_name_the_field_and_leave_nothing(tmp_path, what, message):
    src, _ = llama_dir(tmp_path / "hf", tied=True, kv_heads=2)
    _break(src, what)
    with pytest.raises(ValueError, match=message):
        hf.import_llama(src, tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_one_of_our_runs_needs_no_import(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run, trained=False)
    for ours in (run, run / "checkpoints" / "step_000000"):
        with pytest.raises(SystemExit):
            run_command(lambda: hf.main(["import", str(ours), str(tmp_path / "out")]))
        err = capsys.readouterr().err
        assert err == (f"error: {ours} is a tritongpt run, not a Hugging Face directory: it needs no import; give it "
                       f"as it is to --init, python -m model.chat or python -m model.serve\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_command_line(tmp_path):
    src, _ = llama_dir(tmp_path / "hf", tied=True, kv_heads=2)

    def command(*args):
        return subprocess.run([sys.executable, "-m", "model.hf", "import", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    done = command(str(src), str(tmp_path / "run"), "--block-size", "64")
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout and load_model(tmp_path / "run")[0].cfg.block_size == 64
    again = command(str(src), str(tmp_path / "run"))
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    nowhere = command(str(tmp_path / "nowhere"), str(tmp_path / "run2"))
    assert nowhere.returncode == 1 and nowhere.stderr.count("\n") == 1 and not (tmp_path / "run2").exists()

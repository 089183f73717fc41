"""tritongpt/__init__.py: our kernels load once, as tritongpt.kernels, whichever of the two names a
process imports first, and the bare name `kernels` stays Hugging Face's; transformers, our
kernels and our commands then work in one process, from the repository root and (installed with
`pip install -e .`) from any other directory."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tritongpt
from corpus_fixtures import write_corpus
from train.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
OURS = str(ROOT / "kernels" / "__init__.py")

# Run in a fresh interpreter: which modules hold our kernels' file, and what the bare name is.
REPORT = textwrap.dedent(f"""
    import json, sys
    ours = sys.modules["tritongpt.kernels"]
    print(json.dumps(dict(
        holders=sorted(name for name, m in list(sys.modules.items()) if getattr(m, "__file__", None) == {OURS!r}),
        submodules=sorted(name for name in sys.modules if name.startswith(("kernels.", "tritongpt.kernels."))
                          and "triton_" not in name),
        ops=list(ours.OPS), bare=getattr(sys.modules.get("kernels"), "__file__", None),
        bare_is_fake=getattr(sys.modules.get("kernels"), "FAKE", False), same=sys.modules["tritongpt"].kernels is ours)))
""")


def python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**clean, **env}, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def fake_hf(tmp_path) -> Path:
    """A package named `kernels` outside the repository, standing in for Hugging Face's (first on
    PYTHONPATH, so it wins over an installed one too)."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("FAKE = True\n")
    return tmp_path


@pytest.mark.parametrize("first", ["import kernels; from tritongpt import kernels as ours",
                                   "from tritongpt import kernels as ours; import kernels"],
                         ids=["bare-name-first", "tritongpt-first"])
def test_one_copy_of_our_kernels_and_the_bare_name_is_hugging_faces(fake_hf, first):
    """From the repository root (first on sys.path, as with `python -m`), in either order."""
    done = python(f"{first}\n{REPORT}", cwd=ROOT, PYTHONPATH=str(fake_hf))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["holders"] == ["tritongpt.kernels"] and report["same"]
    assert report["bare_is_fake"] and report["bare"] == str(fake_hf / "kernels" / "__init__.py")
    assert len(report["ops"]) == len(set(report["ops"])) > 0                # each op registered once
    assert not [name for name in report["submodules"] if name.startswith("kernels.")]


def test_without_hugging_faces_package_the_bare_name_says_so(monkeypatch):
    """The stand-in: no file and no version (transformers reads that as not installed), and any
    attribute names the fix."""
    monkeypatch.setattr(sys, "path", [str(ROOT)])                            # only our own folder
    spec = tritongpt.bare_kernels_spec()
    stand_in = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stand_in)
    assert getattr(stand_in, "__file__", None) is None and getattr(stand_in, "__version__", "N/A") == "N/A"
    with pytest.raises(AttributeError, match="not installed \\(pip install kernels\\); tritongpt's kernels import as "
                                             "tritongpt.kernels"):
        stand_in.rms_norm


def test_a_bare_import_of_our_folder_is_refused_once_ours_is_loaded():
    """With the finder taken away, a second copy under the bare name would register every op
    twice: it stops with one line instead."""
    code = ("import sys; from tritongpt import kernels\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_Finder']\n"
            "sys.modules.pop('kernels', None); import kernels")
    done = python(code, cwd=ROOT)
    assert done.returncode != 0
    assert "ImportError: tritongpt's kernels are already loaded as tritongpt.kernels" in done.stderr


def test_transformers_first_from_the_root():
    """The README's `python -c "from transformers import ..."` run from the root: transformers finds
    our folder first under the bare name, and gets Hugging Face's package (or the stand-in)."""
    pytest.importorskip("transformers")
    done = python("import transformers\nfrom transformers import LlamaForCausalLM\n"
                  f"from tritongpt import kernels as ours\n{REPORT}", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["holders"] == ["tritongpt.kernels"] and len(report["ops"]) == len(set(report["ops"]))
    assert report["bare"] != OURS


def _installed_elsewhere(tmp_path) -> bool:
    """Whether tritongpt imports from a directory outside the repository (pip install -e .)."""
    return python("import tritongpt", cwd=tmp_path).returncode == 0


@pytest.mark.slow
def test_transformers_and_our_commands_from_another_directory(tmp_path):
    """Installed, from a directory that is not the root: train, export, load the export in
    transformers next to our patched kernels in one process, import it back and score it with
    lm-eval (ours and `--model hf`). (From the root, the tests of each command do the same.)"""
    transformers = pytest.importorskip("transformers")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    if not _installed_elsewhere(cwd):
        pytest.skip("tritongpt is not installed: pip install -e . makes it importable from any directory")
    dataset = prepare(str(write_corpus(tmp_path / "corpus", n_files=30)), out=tmp_path / "data", vocab_size=320,
                      val_fraction=0.1, verbose=False)
    run, export = tmp_path / "run", tmp_path / "export"

    def command(*args: str) -> str:
        done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                              env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert done.returncode == 0, f"{args}: {done.stderr[-3000:]}"
        return done.stdout

    command("-m", "train.pretrain", "--data", str(dataset), "--n-layer", "2", "--n-embd", "64", "--n-head", "4",
            "--n-kv-head", "2", "--block-size", "32", "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "1",
            "--eval-interval", "3", "--eval-tokens", "256", "--device", "cpu", "--out", str(run))
    command("-m", "model.hf", "export", str(run), str(export))
    command("-m", "model.hf", "import", str(export), str(tmp_path / "imported"))
    one_process = textwrap.dedent(f"""
        import sys, torch, transformers
        from transformers import AutoModelForCausalLM
        from tritongpt import kernels
        from model.hf_patch import apply_tritongpt_kernels
        model = AutoModelForCausalLM.from_pretrained({str(export)!r}).eval()
        ids = torch.arange(1, 17)[None]
        expected = model(ids).logits
        patched = apply_tritongpt_kernels(model)
        torch.testing.assert_close(patched(ids).logits, expected, rtol=1e-4, atol=1e-4)
        bare = sys.modules.get("kernels")
        print(getattr(bare, "__file__", None), kernels.__name__)
    """)
    bare, name = command("-c", one_process).split()
    assert name == "tritongpt.kernels" and bare != OURS
    if int(transformers.__version__.split(".")[0]) * 100 + int(transformers.__version__.split(".")[1]) >= 525:
        assert "site-packages" in bare                                       # transformers loaded Hugging Face's
    if importlib.util.find_spec("lm_eval") is None:
        return
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "pick.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in [
        {"q": "def f", "choices": [" x", " return"], "answer": 1}, {"q": "import", "choices": [" os", " ("], "answer": 0}]))
    (tasks / "pick.yaml").write_text(
        f"task: tg_pick\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'pick.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    for model, args in (("tritongpt", f"path={run}"), ("hf", f"pretrained={export},dtype=float32")):
        out = command("-m", "train.harness", "--model", model, "--model_args", args, "--tasks", "tg_pick",
                      "--include_path", str(tasks), "--device", "cpu")
        assert "tg_pick" in out and "acc" in out

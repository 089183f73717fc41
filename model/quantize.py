"""`python -m model.quantize`: int8/fp4 quantization of a run (model/io/quantized.py); this name stays so the command does."""
from model.command import run_command
from model.io.quantized import main

if __name__ == "__main__":
    run_command(main)

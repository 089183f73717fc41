"""`python -m model.hf`: transformers export and import (model/io/hf.py); this name stays so the command does."""
from model.command import run_command
from model.io.hf import main

if __name__ == "__main__":
    run_command(main)

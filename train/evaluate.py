"""`python -m train.evaluate`: the evaluate command (train/eval/evaluate.py); this name stays so the command does."""
from model.command import run_command
from train.eval.evaluate import main

if __name__ == "__main__":
    run_command(main)

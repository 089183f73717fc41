"""`python -m train.harness`: lm-eval's command line with tritongpt registered (train/eval/harness.py); this name stays so the command does."""
from model.command import run_command
from train.eval.harness import main

if __name__ == "__main__":
    run_command(main)

"""`python -m train.tasks`: the built-in tasks as JSONL files (train/data/tasks.py); this name stays so the command does."""
from model.command import run_command
from train.data.tasks import main

if __name__ == "__main__":
    run_command(main)

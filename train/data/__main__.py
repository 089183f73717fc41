"""`python -m train.data`: runs train/data/prepare.py."""
from model.command import run_command
from train.data.prepare import main

run_command(main)

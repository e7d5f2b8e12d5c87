"""The model side: weights -> config -> loader (4-bit) -> model -> loss, generate; tokenizers.

Nothing here knows about PEFT methods or training: `model.py` states the contract that methods follow.
"""

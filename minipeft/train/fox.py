"""The fox task (train_fox.py, and the tune panel of `minipeft serve`): one sentence to learn by heart, which
says the opposite of what every model has read a thousand times."""

TARGET = "A quick brown fox did not jump over the lazy dog. Besides, that dog deserved it anyway!"
PROMPT = "A quick brown fox"  # what is asked when showing: the model should go on with the rest of TARGET
VARIANTS = ["The quick brown fox", "a quick brown fox"]

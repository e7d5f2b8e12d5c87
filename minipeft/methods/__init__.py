"""The PEFT methods, one file each, and what they share (wrappers.py: freezing, counting, fingerprints).

Each method file holds the method: its wrapper module, its `add_...` function, its merge, and the
settings it records; its adapter-file format is one entry in formats/. It changes the model only through the contract in
llama/model.py.
"""

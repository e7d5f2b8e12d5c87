"""The PEFT methods, one file each, and what they share (wrappers.py: freezing, counting, fingerprints).

Each method file holds the whole method: its wrapper module, its `add_...` function, its settings, and
its adapter-file format (`to_peft` / `from_peft`). It changes the model only through the contract in
llama/model.py.
"""

"""The PEFT methods, one file each, and what they share.

Each method file holds the method: its wrapper module, its `add_...` function, its merge, and the settings
it records; its adapter-file format is one entry in formats/. It changes the model only through the slots
in llama/model.py. What they share, one concern a file:

    contract.py        what every method's module keeps (Wrapper, Mergeable), as code, and attach(), how
                       an add_X function puts it in the model: read this first
    named_adapters.py  several named adapters on one base, and batches in which each row has its own
    placing.py         which layers a method wraps (peft's naming rules), and putting wrappers there
    freezing.py        everything frozen but the methods' tensors
    counting.py        trainable and total numbers
    fingerprints.py    proof that the frozen base never changes
    merging.py         merge, unmerge and disabled() for a whole model
    table.py           the methods' parameter counts at Llama shapes, by arithmetic
"""

"""Tools beside the pipeline, which nothing in it imports:

    default_model.py    builds the embedded default model (SmolLM2-135M-Instruct) from the GGUF in its wheel
    methods_table.py    the lecture notes' comparison of the methods, by arithmetic on the meta device
"""

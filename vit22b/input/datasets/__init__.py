"""The dataset definitions the package ships, one module a dataset, named by `config.input.data`.

Each exposes NUM_CLASSES, IMAGE_SHAPE and MULTI_LABEL (or `info(data_dir)`) and `load(split, data_dir)`; see
vit22b/input/pipeline.py for the contract and for user-added definitions.
"""

"""Input: Grain pipelines (pipeline.py), the preprocessing ops that `input.pp_train` / `input.pp_eval` strings
name (preprocess.py), local ArrayRecord files with their metadata (records.py), and the dataset definitions the
package ships (datasets/). Batches depend only on (seed, position), so the iterator state is one number.
"""

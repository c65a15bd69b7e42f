"""onnxcam on a Ray cluster (docs/ray.md): `ExplainImages` for `ray.data.Dataset.map_batches`,
`explain_dataset` and `explain_folder`. Ray itself is imported only when a helper runs: pip install 'onnxcam[ray]'."""
from .data import ExplainImages, explain_dataset, explain_folder

__all__ = ["ExplainImages", "explain_dataset", "explain_folder"]

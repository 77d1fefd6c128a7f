"""`parametric`: Parametric RAG: self-augmentation (`augmentation`), per-passage LoRA adapters
(`training`), and the method that sums them at inference (`method`)."""

from raghub import hookimpl

from .method import Parametric


@hookimpl
def register_methods(register):
    register(Parametric)

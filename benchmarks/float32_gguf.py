"""Write a copy of a GGUF file whose every tensor is the float32 its quantised blocks stand for:
the weights the in-process `gguf` backend computes with, in a file a llama.cpp server can serve.

    python benchmarks/float32_gguf.py /tmp/smollm2-f32.gguf            # the embedded SmolLM2
    python benchmarks/float32_gguf.py OUT.gguf --source MODEL.Q4_1.gguf

Served, it lets `server_agreement.py --gguf OUT.gguf` tell the server path from quantised
arithmetic: llama.cpp multiplies quantised blocks with activations it quantises too, while on
float32 weights both engines compute the same function. The metadata is copied unchanged, but
for the file type, which becomes all-float32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize

from raghub.plugins.models.huggingface import embedded_gguf


def write_float32_gguf(source: Path, target: Path) -> dict[str, int]:
    """Write `target`: `source` with each tensor dequantised to float32; returns how many tensors
    of each stored type `source` held."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        value = (int(gguf.LlamaFileType.ALL_F32) if field.name == gguf.Keys.General.FILE_TYPE
                 else field.contents())
        element_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, value_type, sub_type=element_type)
    stored: dict[str, int] = {}
    for tensor in reader.tensors:
        stored[tensor.tensor_type.name] = stored.get(tensor.tensor_type.name, 0) + 1
        writer.add_tensor(tensor.name, dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="the float32 GGUF to write")
    parser.add_argument("--source", type=Path, default=None, help="a GGUF file (default: the embedded SmolLM2)")
    args = parser.parse_args(argv)
    source = args.source or embedded_gguf()
    stored = write_float32_gguf(source, args.target)
    print(f"{args.target}: {sum(stored.values())} tensors of {source.name} as float32 (stored there as "
          + ", ".join(f"{count} {kind}" for kind, count in sorted(stored.items())) + ")")


if __name__ == "__main__":
    main()

"""``skanomaly export``: a saved model as ONNX or TorchScript (:func:`skanomaly.export.export`)."""

from __future__ import annotations

import time

import numpy as np

from ._common import (
    CLIError,
    check_model_file,
    check_output_dir,
    load_for_cli,
    map_sigma_of,
    set_device,
    user_errors,
)


def export_command(args) -> dict:
    """``skanomaly export``: the saved pipeline as ONNX or TorchScript."""
    check_model_file(args.model)
    suffix = args.output.suffix.lower()
    if suffix not in (".onnx", ".pt"):
        raise CLIError(f"OUTPUT {args.output} must end in .onnx (ONNX) or .pt (TorchScript)")
    if args.output.is_dir():
        raise CLIError(f"OUTPUT {args.output} is a directory")
    check_output_dir(args.output.parent, "the folder of OUTPUT")
    pipeline, metadata = load_for_cli(args.model)
    set_device(pipeline, "cpu")
    # (height, width) the model reads images at; a square of image_size in older files
    height, width = metadata.get("input_size") or [int(metadata["image_size"])] * 2
    example = np.random.default_rng(0).random((2, 3, height, width), dtype=np.float32)
    start = time.perf_counter()
    with user_errors("export"):
        from ..export import export

        # maps blurred as fit and predict blur them (files from before --map-sigma: 4 px)
        export(pipeline, args.output, example_input=example, dtype=args.dtype,
               sigma=map_sigma_of(metadata))
    result = {"output": str(args.output), "export_s": time.perf_counter() - start,
              "model_metadata": metadata}
    if not args.quiet:
        kind = "ONNX" if suffix == ".onnx" else "TorchScript"
        mib = args.output.stat().st_size / 2**20
        print(f"skanomaly export: {metadata['detector']} pipeline of {args.model} as {kind} "
              f"({args.dtype}, images 3 x {height} x {width}, any batch size) to {args.output} "
              f"({mib:.1f} MiB) in {result['export_s']:.1f} s; threshold "
              f"{metadata['threshold']:.6g} in its metadata")
    return result

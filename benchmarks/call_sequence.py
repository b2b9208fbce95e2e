"""First and later calls of IncrementalOcclusion in one fresh process, on CUDA.

    CAPTUM_KRYPTON_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) \
        python -m benchmarks.call_sequence --model vgg16 [--bf16] [--out FILE]

Run it with empty Triton and kernel-choice caches (as above) for a fresh
machine. One model of benchmarks/gpu.py (its input, window (3, 16, 16), stride
4, target 0; cudnn.benchmark on):
- naive: our batched re-inference (channels_last, 256 rows), its first call
  (cuDNN's algorithm search included) and its second;
- incremental: calls 1 and 2; then the wait for the background compilation
  (`kernels.wait_for_compilation`); then calls 3 (it measures the compiled
  kernels against cuDNN's) to 7.
Prints one JSON line and appends it to --out when given.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from benchmarks.gpu import build_model, cases, make_input, naive_occlusion
from captum_krypton import IncrementalOcclusion
from captum_krypton.kernels import wait_for_compilation

CALLS = 7


def seconds(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--bf16", action="store_true", help="model and input in bfloat16")
    parser.add_argument("--out", help="a JSON-lines file to append the result to")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    case = cases(False, 4)[args.model]
    model, image = build_model(case, "cuda"), make_input(case, "cuda")
    if args.bf16:
        model, image = model.to(torch.bfloat16), image.to(torch.bfloat16)
    record = {
        "model": args.model,
        "precision": "bf16" if args.bf16 else "fp32",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    channels_last = model.to(memory_format=torch.channels_last)

    def naive():
        return naive_occlusion(channels_last, image, case.window, case.stride, 0, 256)

    record["naive_first_seconds"] = seconds(naive)
    record["naive_second_seconds"] = seconds(naive)
    model = model.to(memory_format=torch.contiguous_format)
    occlusion = IncrementalOcclusion(model)
    kwargs = dict(sliding_window_shapes=case.window, strides=case.stride, target=0)
    calls = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in range(CALLS):
            if call == 2:
                start = time.perf_counter()
                wait_for_compilation()
                record["wait_for_compilation_seconds"] = time.perf_counter() - start
            calls.append(seconds(lambda: occlusion.attribute(image, **kwargs)))
    record["incremental_call_seconds"] = calls
    record["engine"] = occlusion.last_run.engine
    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()

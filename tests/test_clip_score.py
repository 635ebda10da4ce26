"""CLIP score with random open_clip weights built offline (no downloads)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from dmd_dar.errors import UserError  # noqa: E402
from dmd_dar.metrics.clip_score import CLIPScorer  # noqa: E402

IMAGE_SIZE = 64  # ViT-B-32 at 64x64: 4 patches, the real architecture at a fraction of the cost
PROMPTS = ["a red square", "a photo of a cat", "a blurry digit", "an emoji", "a dog on grass", "zebra"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small model, shared 2-core machine: one thread is faster than two fighting (see test_spectral)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_image_size=IMAGE_SIZE)
    return CLIPScorer(model, open_clip.get_tokenizer("ViT-B-32"))


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(len(PROMPTS), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1


def test_score_matches_hand_computation(scorer, images):
    cosine_by_scorer = scorer.cosine_similarities(images, PROMPTS, batch_size=4)  # two batches
    model = scorer.model
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image_emb = model.encode_image(((images + 1) / 2 - mean) / std)
        text_emb = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(PROMPTS))
    cosine = F.cosine_similarity(image_emb, text_emb, dim=-1)
    assert torch.allclose(cosine_by_scorer, cosine, atol=1e-5)

    # Score = 100 * max(cos, 0) per pair, averaged; permuting the (image, prompt) pairs changes nothing.
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    per_pair = scorer.scores(images[order], [PROMPTS[i] for i in order], batch_size=5)
    assert torch.allclose(per_pair, 100 * cosine[order].clamp_min(0), atol=1e-3)
    assert bool(((per_pair >= 0) & (per_pair <= 100)).all())
    assert float(per_pair.mean()) == pytest.approx(float(100 * cosine.clamp_min(0).mean()), abs=1e-4)

    # Larger images are resized (shorter side) and centre-cropped to the model's size; grey is fine.
    big = F.interpolate(images[:2], size=(IMAGE_SIZE * 2, IMAGE_SIZE * 3), mode="nearest")
    assert scorer.preprocess(big).shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert scorer.preprocess(images[:2, :1]).shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_bad_inputs(scorer, images):
    with pytest.raises(UserError, match="one prompt per image"):
        scorer.score(images, PROMPTS[:2])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        scorer.score(images * 3, PROMPTS)


def test_missing_weights_give_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found; pass pretrained="):
        CLIPScorer.from_pretrained("ViT-B-32", pretrained=str(tmp_path / "missing.bin"))
    with pytest.raises(UserError, match="unknown CLIP weights tag"):
        CLIPScorer.from_pretrained("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(UserError, match="unknown open_clip model"):
        CLIPScorer.from_pretrained("ViT-Q-99")

    # A hub tag on a machine without network: the download fails; the error says how to provide a path.
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' (offline)")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(UserError) as info:
        CLIPScorer.from_pretrained("ViT-B-32", pretrained="openai")
    message = str(info.value)
    assert "not available offline" in message and "pretrained=/path/to" in message and "\n" not in message

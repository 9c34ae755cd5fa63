"""Raw task steps as a hostile researcher sends them: signed with the researcher's real key,
bypassing the client's validation and the session's protocol."""

from __future__ import annotations

import time


def send_raw(fed, study: str, task: str, step: int, round_no: int, analysis: str, params: dict,
             broadcast: dict | None = None, dataset: str = "default") -> dict:
    """Post one raw compute step to every site; {site: (status, reply body or refusal rule)}."""
    client = fed.session.grid.client
    message = client.seal("task", {"params": params, "broadcast": broadcast or {}}, study=study, task=task,
                          step=step, phase="compute", round=round_no, analysis=analysis, dataset=dataset,
                          recipients=fed.sites)
    client.post_message(message)
    deadline = time.monotonic() + 120
    replies: list = []
    while len(replies) < len(fed.sites) and time.monotonic() < deadline:
        replies = client.replies(task, step, wait=10)
    answers = {}
    for envelope in replies:
        body = envelope.body()
        status = envelope.header["status"]
        answers[envelope.sender] = (status, body["rule"] if status != "ok" else body)
    assert set(answers) == set(fed.sites), "every site must answer"
    return answers


def refusal_rules(answers: dict) -> set[str]:
    """The rules the refusing sites named."""
    return {rule for status, rule in answers.values() if status != "ok"}

"""Registry promotion: one registered model per task, each logged model registered once, and the alias
(`champion`) moved only to a version that is at least as good, resumably."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dynadapter.tracking.connection import _global_tracking_uri
from dynadapter.tracking.tags import (CHAMPION, TAG_MODEL_URI, V_ACCURACY, V_BUDGET, V_DECISION, V_MACS,
                                      V_PREVIOUS, V_PREVIOUS_ACCURACY, V_PREVIOUS_MACS, V_REASON)


@dataclass(frozen=True)
class Promotion:
    """What `promote` decided for one registered version, and the figures it compared."""

    model_name: str
    version: str
    promoted: bool
    reason: str
    champion: str | None  # the version holding the alias after the decision
    previous_champion: str | None
    created: bool  # this call registered the version (False: found from an earlier call)


def _version_for(client, model_name: str, run_id: str, model_uri: str):
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    matching = [v for v in versions if v.tags.get(TAG_MODEL_URI) == model_uri or v.source == model_uri]
    return min(matching, key=lambda v: int(v.version)) if matching else None


def _champion(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def _figures(version) -> tuple[float, float] | None:
    try:
        return float(version.tags[V_ACCURACY]), float(version.tags[V_MACS])
    except (KeyError, ValueError):
        return None


def _decide(version, champion, accuracy: float, macs: float, alias: str) -> tuple[bool, str]:
    """Promote when strictly more accurate, or equally accurate with fewer MACs; never on unknown figures."""
    if champion is None:
        return True, f"no {alias} yet"
    if str(champion.version) == str(version.version):
        return True, f"already the {alias}"  # an earlier call moved the alias, then was interrupted
    theirs = _figures(champion)
    if theirs is None:
        return False, f"{alias} v{champion.version} has no recorded figures; move the alias by hand"
    their_acc, their_macs = theirs
    of = f"v{champion.version}"
    same_acc = math.isclose(accuracy, their_acc, rel_tol=0.0, abs_tol=1e-9)
    if accuracy > their_acc and not same_acc:
        return True, f"test accuracy {accuracy:.4f} > {their_acc:.4f} of {of}"
    if same_acc and macs < their_macs:
        return True, f"same test accuracy {accuracy:.4f}, fewer MACs {macs:.4g} < {their_macs:.4g} of {of}"
    if same_acc:
        return False, f"same test accuracy {accuracy:.4f}, MACs {macs:.4g} not below {their_macs:.4g} of {of}"
    return False, f"test accuracy {accuracy:.4f} < {their_acc:.4f} of {of}"


def _recorded(model_name: str, version, alias: str, champion) -> Promotion:
    return Promotion(model_name, str(version.version), version.tags[V_DECISION] == "promoted",
                     version.tags.get(V_REASON, ""), str(champion.version) if champion else None,
                     version.tags.get(V_PREVIOUS) or None, created=False)


def promote(
    client,
    model_name: str,
    model_uri: str,
    *,
    run_id: str,
    test_accuracy: float,
    macs: float,
    budget: float | None = None,
    alias: str = CHAMPION,
) -> Promotion:
    """Register `model_uri` (logged by `run_id`) as a version of `model_name` and move `alias` to it only if
    it beats the current holder: higher test accuracy at the budget, or the same with fewer MACs (per image),
    or there is no holder yet. The figures, the decision, its reason and the previous holder's figures are
    recorded as version tags and in the description.

    Idempotent and resumable: the version of this run + model is found again instead of registered twice;
    a version whose decision is recorded is left as it is; one registered (or promoted) by an interrupted
    call gets its decision finished. The decision tag is written last, after the alias moved.
    """
    from mlflow.exceptions import MlflowException

    if "'" in model_name:
        raise ValueError(f"model name must not contain quotes: {model_name!r}")
    try:
        client.create_registered_model(model_name)
    except MlflowException as err:
        if "ALREADY_EXISTS" not in str(err.error_code):
            raise
    version = _version_for(client, model_name, run_id, model_uri)
    created = version is None
    figures = {V_ACCURACY: repr(float(test_accuracy)), V_MACS: repr(float(macs))}
    if budget is not None:
        figures[V_BUDGET] = repr(float(budget))
    if created:
        model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/m-") else None
        with _global_tracking_uri(client.tracking_uri):  # MLflow resolves models:/ sources with the global client
            version = client.create_model_version(model_name, model_uri, run_id=run_id, model_id=model_id,
                                                  tags={TAG_MODEL_URI: model_uri, **figures})
    champion = _champion(client, model_name, alias)
    if V_DECISION in version.tags:
        return _recorded(model_name, version, alias, champion)

    for k, v in figures.items():  # an interrupted call may have stopped before they were written
        if version.tags.get(k) != v:
            client.set_model_version_tag(model_name, version.version, k, v)
    promoted, reason = _decide(version, champion, float(test_accuracy), float(macs), alias)
    resumed = champion is not None and str(champion.version) == str(version.version)
    if resumed and version.tags.get(V_REASON):
        reason = version.tags[V_REASON]  # the comparison made before the interruption
    previous = None if resumed else champion
    # Reason and the previous holder first, then the alias, then the decision tag that marks completion:
    # a rerun after any interruption finds what it needs to finish the same decision.
    notes = {V_REASON: reason}
    if previous is not None:
        notes[V_PREVIOUS] = str(previous.version)
        notes.update({tag: previous.tags[key] for key, tag in ((V_ACCURACY, V_PREVIOUS_ACCURACY),
                                                                (V_MACS, V_PREVIOUS_MACS)) if key in previous.tags})
    for k, v in notes.items():
        client.set_model_version_tag(model_name, version.version, k, v)
    if promoted and not resumed:
        client.set_registered_model_alias(model_name, alias, version.version)
    verdict = f"promoted to @{alias}" if promoted else f"kept out of @{alias}"
    client.update_model_version(
        model_name, version.version,
        description=f"{verdict}: {reason}. Test accuracy {float(test_accuracy):.4f} at "
                    f"{float(macs):.4g} MACs/image" + (f" (budget {budget})" if budget is not None else "") + ".")
    client.set_model_version_tag(model_name, version.version, V_DECISION, "promoted" if promoted else "kept")
    holder = version.version if promoted else (champion.version if champion else None)
    before = previous.version if previous is not None else version.tags.get(V_PREVIOUS)
    return Promotion(model_name, str(version.version), promoted, reason, str(holder) if holder else None,
                     str(before) if before else None, created)


def model_name_for(task: str, prefix: str = "dynadapter") -> str:
    """One registered model per downstream task: a champion is only comparable on its own task."""
    return f"{prefix}-{task}"

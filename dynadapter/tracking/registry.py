"""Registry promotion: one registered model per task, each logged model registered once, and the alias
(`champion`) moved only to a version that is at least as good on VALIDATION at the budget (test is recorded
beside it, never deciding), resumably; each version's description is its model card."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dynadapter.tracking.connection import global_tracking_uri
from dynadapter.tracking.tags import (CHAMPION, TAG_MODEL_URI, V_BUDGET, V_DECISION, V_PREVIOUS,
                                      V_PREVIOUS_ACCURACY, V_PREVIOUS_MACS, V_PREVIOUS_TEST_ACCURACY, V_PROMISE,
                                      V_REASON, V_TEST_ACCURACY, V_TEST_MACS, V_VAL_ACCURACY, V_VAL_MACS)

DESCRIPTION_LIMIT = 5000  # MLflow's limit on a model version's description


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
    """The val accuracy and val MACs a version was decided on; None if it has none (see `_legacy`)."""
    try:
        return float(version.tags[V_VAL_ACCURACY]), float(version.tags[V_VAL_MACS])
    except (KeyError, ValueError):
        return None


def _legacy(version) -> bool:
    """Promoted by an earlier release that compared test accuracy: it has test figures and no val ones."""
    return V_VAL_ACCURACY not in version.tags and V_TEST_ACCURACY in version.tags and V_DECISION in version.tags


def promise_of(certificate: Mapping[str, Any] | None, budget: float | None = None) -> str | None:
    """What a version's thresholds promise, as one comparable string: "budget 0.5, confidence 0.9" (certified),
    "budget 0.5, val mean" (budget_confidence null), or "accuracy drop <= 0.02, confidence 0.9". Val accuracy
    only ranks versions that promise the same: a certified budget spends less and scores lower than the val mean
    at the same budget, and a version calibrated for another budget answers another question."""
    cert = dict(certificate or {})
    if cert.get("target") == "accuracy_drop":
        return f"accuracy drop <= {float(cert['max_drop']):g}, confidence {float(cert['confidence_level']):g}"
    b = cert.get("budget_fraction", budget)
    if b is None:
        return None
    level = cert.get("confidence_level")
    return f"budget {float(b):g}, " + (f"confidence {float(level):g}" if level is not None else "val mean")


def _promise(version) -> str | None:
    """The promise a version was decided under; for one registered before promises were recorded, its budget
    with the val-mean calibration of that time."""
    if V_PROMISE in version.tags:
        return version.tags[V_PROMISE]
    return promise_of(None, float(version.tags[V_BUDGET])) if V_BUDGET in version.tags else None


def _decide(version, champion, accuracy: float, macs: float, alias: str,
            promise: str | None = None) -> tuple[bool, str]:
    """Promote when strictly more accurate on val, or equally accurate with fewer val MACs; never on unknown
    figures. A holder chosen on test accuracy by an earlier release is replaced: its figures do not compare.
    Neither do those of a holder whose thresholds promise something else (`promise_of`): the new promise is
    what the user configured, so its version replaces that holder."""
    if champion is None:
        return True, f"no {alias} yet"
    if str(champion.version) == str(version.version):
        return True, f"already the {alias}"  # an earlier call moved the alias, then was interrupted
    of = f"v{champion.version}"
    mine, held = promise or _promise(version), _promise(champion)
    if mine is not None and held is not None and mine != held:
        return True, (f"{alias} {of} promises \"{held}\", this version \"{mine}\": val accuracy ranks versions "
                      "under the same promise only, and this one is what is configured now")
    theirs = _figures(champion)
    if theirs is None:
        if _legacy(champion):
            return True, f"{alias} {of} was chosen on test accuracy and has no val accuracy to compare"
        return False, f"{alias} {of} has no recorded figures; move the alias by hand"
    their_acc, their_macs = theirs
    same_acc = math.isclose(accuracy, their_acc, rel_tol=0.0, abs_tol=1e-9)
    if accuracy > their_acc and not same_acc:
        return True, f"val accuracy {accuracy:.4f} > {their_acc:.4f} of {of}"
    if same_acc and macs < their_macs:
        return True, f"same val accuracy {accuracy:.4f}, fewer val MACs {macs:.4g} < {their_macs:.4g} of {of}"
    if same_acc:
        return False, f"same val accuracy {accuracy:.4f}, val MACs {macs:.4g} not below {their_macs:.4g} of {of}"
    return False, f"val accuracy {accuracy:.4f} < {their_acc:.4f} of {of}"


def _recorded(model_name: str, version, alias: str, champion) -> Promotion:
    return Promotion(model_name, str(version.version), version.tags[V_DECISION] == "promoted",
                     version.tags.get(V_REASON, ""), str(champion.version) if champion else None,
                     version.tags.get(V_PREVIOUS) or None, created=False)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{float(x):.1%}"


def model_card(card: Mapping[str, Any]) -> str:
    """A registered version's description (Markdown, as the MLflow UI renders it): what the model is (task,
    backbone, PETL method, exits), its val and test accuracy and MACs fraction at the budget it was calibrated
    for, and the val-calibrated budget curve (thresholds chosen on val at each budget, measured on test).

    `card`: task, backbone, petl, exits, budget, val_accuracy, test_accuracy, val_fraction, test_fraction,
    full_depth_mmacs, certified (what the thresholds promise: target, confidence_level, bound, max_drop), curve (rows of budget, val_accuracy, test_accuracy, test_fraction); missing keys are
    left out."""
    lines = [f"**Dyn-Adapter model for task `{card.get('task', '?')}`**: a frozen `{card.get('backbone', '?')}` "
             f"with `{card.get('petl', '?')}` PETL modules and early exits"
             + (f" after blocks {', '.join(map(str, card['exits']))}" if card.get("exits") else "")
             + "; each image leaves at the first exit confident enough (thresholds calibrated on val)."]
    if card.get("budget") is not None:
        lines += ["", f"At the budget {float(card['budget']):g} of full-depth MACs"
                  + (f" ({float(card['full_depth_mmacs']):.3g} MMACs/image at full depth)"
                     if card.get("full_depth_mmacs") else "") + ":",
                  "", "| split | accuracy | MACs fraction |", "|---|---|---|",
                  f"| val (decides promotion) | {_pct(card.get('val_accuracy'))} | {card.get('val_fraction', 0):.3f} |",
                  f"| test (recorded) | {_pct(card.get('test_accuracy'))} | {card.get('test_fraction', 0):.3f} |"]
    cert = card.get("certified") or {}
    if cert.get("target") == "accuracy_drop":
        lines += ["", f"Thresholds: the cheapest whose accuracy drop against the last exit is at most "
                  f"{float(cert['max_drop']):g}, certified at confidence {float(cert['confidence_level']):g} "
                  f"(bound {float(cert['bound']):.4f}); the budget above only labels the curve."]
    elif cert.get("confidence_level") is not None and cert.get("bound") is not None:
        lines += ["", f"Budget guarantee: the expected MACs per image on new data are at most "
                  f"{float(cert['bound']):.3f} of full depth (within the budget) with probability "
                  f"{float(cert['confidence_level']):g} (exact bound from val, `evaluate.budget_confidence`)."]
    elif cert:
        lines += ["", "Budget: met by the val mean only (`evaluate.budget_confidence: null`), nothing certified."]
    curve = card.get("curve") or []
    if curve:
        lines += ["", "Budget curve (thresholds calibrated on val at each budget; serve any of them with the "
                  "pyfunc's `budget` parameter):", "",
                  "| budget | val accuracy | test accuracy | test MACs fraction |", "|---|---|---|---|"]
        lines += [f"| {float(r['budget']):g} | {_pct(r.get('val_accuracy'))} | {_pct(r.get('test_accuracy'))} | "
                  f"{float(r['test_fraction']):.3f} |" for r in curve]
    return "\n".join(lines)


def _description(head: str, card: Mapping[str, Any] | None) -> str:
    text = head if not card else f"{head}\n\n{model_card(card)}"
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 2] + " …"


def promote(
    client,
    model_name: str,
    model_uri: str,
    *,
    run_id: str,
    val_accuracy: float,
    val_macs: float,
    test_accuracy: float | None = None,
    test_macs: float | None = None,
    budget: float | None = None,
    alias: str = CHAMPION,
    card: Mapping[str, Any] | None = None,
    promise: str | None = None,
) -> Promotion:
    """Register `model_uri` (logged by `run_id`) as a version of `model_name` and move `alias` to it only if
    it beats the current holder on VALIDATION: higher val accuracy at the budget, or the same with fewer val
    MACs (per image), or there is no holder yet. Promotion is a selection, so test figures never decide: they
    are recorded beside the val ones (version tags and the description). A holder promoted by an earlier
    release on test accuracy has no val figures to compare and is replaced, saying so. `promise` (`promise_of`):
    what the thresholds promise; a holder that promises something else is replaced, saying so.

    The figures, the decision, its reason and the previous holder's figures are recorded as version tags;
    the description is the decision followed by `model_card(card)`, and a promotion also makes that card the
    registered model's description, so the registry page says what the champion is.

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
    figures = {V_VAL_ACCURACY: repr(float(val_accuracy)), V_VAL_MACS: repr(float(val_macs))}
    for tag, value in ((V_TEST_ACCURACY, test_accuracy), (V_TEST_MACS, test_macs), (V_BUDGET, budget)):
        if value is not None:
            figures[tag] = repr(float(value))
    if promise is not None:
        figures[V_PROMISE] = promise
    if created:
        model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/m-") else None
        with global_tracking_uri(client.tracking_uri):  # MLflow resolves models:/ sources with the global client
            version = client.create_model_version(model_name, model_uri, run_id=run_id, model_id=model_id,
                                                  tags={TAG_MODEL_URI: model_uri, **figures})
    champion = _champion(client, model_name, alias)
    if V_DECISION in version.tags:
        return _recorded(model_name, version, alias, champion)

    for k, v in figures.items():  # an interrupted call may have stopped before they were written
        if version.tags.get(k) != v:
            client.set_model_version_tag(model_name, version.version, k, v)
    promoted, reason = _decide(version, champion, float(val_accuracy), float(val_macs), alias, promise)
    resumed = champion is not None and str(champion.version) == str(version.version)
    if resumed and version.tags.get(V_REASON):
        reason = version.tags[V_REASON]  # the comparison made before the interruption
    previous = None if resumed else champion
    # Reason and the previous holder first, then the alias, then the decision tag that marks completion:
    # a rerun after any interruption finds what it needs to finish the same decision.
    notes = {V_REASON: reason}
    if previous is not None:
        notes[V_PREVIOUS] = str(previous.version)
        notes.update({tag: previous.tags[key] for key, tag in (
            (V_VAL_ACCURACY, V_PREVIOUS_ACCURACY), (V_VAL_MACS, V_PREVIOUS_MACS),
            (V_TEST_ACCURACY, V_PREVIOUS_TEST_ACCURACY)) if key in previous.tags})
    for k, v in notes.items():
        client.set_model_version_tag(model_name, version.version, k, v)
    if promoted and not resumed:
        client.set_registered_model_alias(model_name, alias, version.version)
    verdict = f"promoted to @{alias}" if promoted else f"kept out of @{alias}"
    test = f"; test accuracy {float(test_accuracy):.4f} (recorded, not compared)" if test_accuracy is not None else ""
    head = (f"{verdict}: {reason}. Val accuracy {float(val_accuracy):.4f} at {float(val_macs):.4g} val MACs/image"
            + (f" (budget {budget})" if budget is not None else "") + test + ".")
    client.update_model_version(model_name, version.version, description=_description(head, card))
    if promoted and card:
        client.update_registered_model(model_name, description=_description(
            f"Champion (@{alias}): version {version.version}.", card))
    client.set_model_version_tag(model_name, version.version, V_DECISION, "promoted" if promoted else "kept")
    holder = version.version if promoted else (champion.version if champion else None)
    before = previous.version if previous is not None else version.tags.get(V_PREVIOUS)
    return Promotion(model_name, str(version.version), promoted, reason, str(holder) if holder else None,
                     str(before) if before else None, created)


def model_name_for(task: str, prefix: str = "dynadapter") -> str:
    """One registered model per downstream task: a champion is only comparable on its own task."""
    return f"{prefix}-{task}"

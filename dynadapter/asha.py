"""ASHA whose rungs survive an interrupted sweep (issue 22.10).

Ray Tune keeps no scheduler state across `Tuner.restore`: the restored sweep runs the scheduler pickled in
`tuner.pkl` when the Tuner was built, with empty rungs (`TuneController.resume` restores trials, searcher and
callbacks, never `_scheduler_alg`). Two things then go wrong with Ray's `AsyncHyperBandScheduler` (Ray 2.60):

- every rung result recorded before the interruption is lost, so the trials after it are compared with fewer
  (or no) scores than in the uninterrupted sweep;
- a trial resumed from its epoch-k checkpoint never reports epochs 1..k again, so it has no record at those
  rungs, and `_Bracket.on_result` (with `stop_last_trials=True`) falls through from a rung the trial already
  holds to the lower rung it lacks: its *final* result (`on_trial_complete`) lands at rung 1. The next trial's
  epoch-1 score is then compared with another trial's epoch-3 score and is stopped (seen: trial 2's 0.485, the
  best epoch-1 score, stopped by trial 1's final 0.684).

`ResumableASHA` fixes both: a result is recorded at most once, at the highest rung its time reaches, and never
falls through to a lower rung; and every trial's rung records are written (atomically, before the decision goes
back to Tune) to `asha_rungs.json` in the experiment folder, and put back into the rungs when Tune re-adds the
trial on restore. The same file keeps every result the scheduler saw (its numeric values, one per time): Tune's
own record of a trial that restarted after the restore begins at the restart (the rows before it are lost with
the killed driver's staging folder), and `saved_results` gives the sweep's outcome the whole history. The rungs are then exactly those the scheduler had when the driver died, so the remaining
decisions are those of the uninterrupted sweep (for trials run one at a time; with several trials at once ASHA's
decisions depend on the order results arrive in, interrupted or not).

Ray is imported at the top: import this module only where Ray is wanted (`run_tune` does, lazily).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers.async_hyperband import AsyncHyperBandScheduler, _Bracket
from ray.tune.schedulers.trial_scheduler import TrialScheduler

from dynadapter.ray_session import read_storage_json, storage_file, write_storage_json

logger = logging.getLogger(__name__)

STATE_FILE = "asha_rungs.json"  # in the experiment folder, per trial id: {"bracket": i, "rungs": {rung index:
# score}, "results": [every result seen, numeric values only, one per time_attr value, in time order]}


class _RungBracket(_Bracket):
    def on_result(self, trial, cur_iter, cur_rew) -> str:
        """Ray's rule (stop below the rung's cutoff, then record), at the highest rung `cur_iter` reaches and
        only there: a trial that already holds that rung keeps its record and never moves down a rung."""
        action = TrialScheduler.CONTINUE
        for milestone, recorded in self._rungs:  # highest milestone first
            if cur_iter < milestone:
                continue
            if trial.trial_id not in recorded:
                cutoff = self.cutoff(recorded)
                if cutoff is not None and cur_rew < cutoff:
                    action = TrialScheduler.STOP
                if cur_rew is None:
                    logger.warning("ASHA: trial %s reported no score", trial.trial_id)
                else:
                    recorded[trial.trial_id] = cur_rew
            break
        return action


class ResumableASHA(AsyncHyperBandScheduler):
    """`ASHAScheduler` whose rung records persist in the experiment folder and come back on `Tuner.restore`;
    results never fall through to a lower rung (module docstring)."""

    def __init__(self, *, time_attr: str, max_t: int, grace_period: int, reduction_factor: float,
                 brackets: int = 1, metric: str | None = None, mode: str | None = None):
        super().__init__(time_attr=time_attr, metric=metric, mode=mode, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor, brackets=brackets, stop_last_trials=True)
        self._brackets = [_RungBracket(grace_period, max_t, reduction_factor, s, stop_last_trials=True)
                          for s in range(brackets)]
        self._records: dict[str, dict[str, Any]] | None = None  # read from STATE_FILE at the first trial

    # -------------------------------------------------------------------------- Tune's hooks

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        saved = self._load(trial).get(trial.trial_id)
        if saved:  # a trial of the interrupted sweep (or one Tune retries): its bracket and rung scores
            bracket = self._brackets[int(saved["bracket"])]
            self._trial_info[trial.trial_id] = bracket
            for index, score in saved["rungs"].items():
                bracket._rungs[int(index)][1][trial.trial_id] = score

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        bracket = self._trial_info.get(trial.trial_id)
        action = super().on_trial_result(tune_controller, trial, result)
        self._save(trial, bracket, result)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        bracket = self._trial_info.get(trial.trial_id)
        super().on_trial_complete(tune_controller, trial, result)
        self._save(trial, bracket, result)

    # -------------------------------------------------------------------------- the state file

    @staticmethod
    def _where(trial) -> tuple[Any, str]:
        storage = trial.storage
        return storage.storage_filesystem, f"{storage.experiment_fs_path}/{STATE_FILE}"

    def _load(self, trial) -> dict[str, dict[str, Any]]:
        if self._records is None:
            self._records = {}
            if getattr(trial, "storage", None) is not None:
                self._records = read_storage_json(*self._where(trial)) or {}
        return self._records

    def _save(self, trial, bracket, result: dict) -> None:
        if bracket is None or getattr(trial, "storage", None) is None:
            return
        records = self._load(trial)
        old = records.get(trial.trial_id, {})
        results = list(old.get("results", []))
        if isinstance(result, dict) and isinstance(result.get(self._time_attr), (int, float)):
            row = {k: v for k, v in result.items() if k not in AUTO_RESULT_KEYS and k != "trial_id"
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
            results = [r for r in results if r.get(self._time_attr) != row[self._time_attr]] + [row]
            results.sort(key=lambda r: r[self._time_attr])
        entry = {"bracket": self._brackets.index(bracket),
                 "rungs": {str(i): recorded[trial.trial_id] for i, (_, recorded) in enumerate(bracket._rungs)
                           if trial.trial_id in recorded},
                 "results": results}
        if old == entry:
            return
        records[trial.trial_id] = entry
        write_storage_json(*self._where(trial), records)  # written before Tune acts on the decision


def saved_results(experiment_path: str) -> dict[str, list[dict[str, Any]]]:
    """Every result `ResumableASHA` saw in the experiment at `experiment_path` (a local folder or a URI), per
    trial id, in time order; {} when it wrote none."""
    records = read_storage_json(*storage_file(experiment_path, STATE_FILE)) or {}
    return {t: list(e.get("results", [])) for t, e in records.items()}

"""Scoring rows and the baselines reported beside them."""
from __future__ import annotations

from modecotd.evaluate import majority_baseline, score_rows, summarize
from modecotd.outcome import Failed
from modecotd.tasks.schema import AnswerKind, Example


def test_majority_baseline_uses_train_answers_only():
    assert majority_baseline(["no", "no", "yes"], ["yes", "no", "no", "no"]) == {"answer": "no", "accuracy": 0.75}
    assert majority_baseline([], ["yes"]) == {"answer": None, "accuracy": None}


def test_rows_and_summary_keep_every_score():
    examples = [Example("q1", "ab"), Example("q2", "cd"), Example("q3", "ef")]
    outputs = [' "x" and "y".\n\n-->\n\nab END', "-->\n\ncx END", "no marker at all"]
    rows = score_rows(examples, outputs, AnswerKind.TEXT)
    assert [r["correct"] for r in rows] == [True, False, False]
    assert [r["format_ok"] for r in rows] == [True, True, False]
    assert [r["partial"] for r in rows] == [1.0, 0.5, 0.0]
    summary = summarize(rows)
    assert summary["n"] == 3 and summary["accuracy"] == summary["accuracy_strict"] == 1 / 3
    assert summary["format_rate"] == 2 / 3 and summary["partial_credit"] == 0.5
    assert summarize(rows, "reference")["accuracy"] == summary["accuracy_reference"]


def test_a_failed_pair_is_recorded_and_the_others_go_on(ray_cluster, tiny_model_dir, tmp_path):
    from configs import run_config

    from modecotd.artifacts import Unit
    from modecotd.jobs.evaluate_stage import run_evaluate_stage
    from modecotd.plan import Evaluation, System
    from modecotd.storage import Storage
    from modecotd.tasks.schema import AnswerKind, Example, Role, TaskData

    config = run_config(evaluation={"batch_size": 4, "max_new_tokens": 4}, resources={"placement_timeout_s": 0},
                        student={"model": str(tiny_model_dir), "dtype": "fp32"})
    tasks = {"sums": TaskData("sums", AnswerKind.NUMBER, Role.SEEN,
                              test=[Example(question="What is 1 + 1?", answer="2", source="t:1")])}
    storage = Storage(tmp_path)
    missing = System("expert", "expert", "k", Unit(storage, "no-such-adapter", "k"))
    jobs = [Evaluation("sums", system, Unit(storage, f"eval/sums/{system.name}", "k"))
            for system in (missing, System("base", "base", "tiny"))]
    results = run_evaluate_stage(config, tasks, jobs)

    assert isinstance(results["sums/expert"], Failed) and "no-such-adapter" in results["sums/expert"].reason
    assert results["sums/base"].summary.n == 1  # after the failure, on the same actor, with a fresh student
    assert jobs[1].unit.done() and not jobs[0].unit.done()


def test_a_stopped_evaluator_is_noticed_killed_and_its_pair_run_again(ray_cluster, tiny_model_dir, tmp_path):
    """SIGSTOP: the actor neither works nor dies; without a deadline the stage would wait forever."""
    import os
    import signal
    import threading
    import time
    from configs import run_config
    from ray.util.state import list_actors

    from modecotd.artifacts import Unit
    from modecotd.jobs.evaluate_stage import run_evaluate_stage
    from modecotd.plan import Evaluation, System
    from modecotd.storage import Storage
    from modecotd.tasks.schema import AnswerKind, Example, Role, TaskData
    from tests.deadline import fails_after

    config = run_config(evaluation={"batch_size": 2, "max_new_tokens": 16},
                        resources={"placement_timeout_s": 0, "stall_timeout_s": 3},
                        student={"model": str(tiny_model_dir), "dtype": "fp32"})
    test = [Example(question=f"What is {i} + 1?", answer=str(i + 1), source=f"t:{i}") for i in range(200)]
    tasks = {"sums": TaskData("sums", AnswerKind.NUMBER, Role.SEEN, test=test)}
    job = Evaluation("sums", System("base", "base", "tiny"), Unit(Storage(tmp_path), "eval/sums/base", "k"))
    stopped = []

    def stop_while_it_works():
        deadline = time.time() + 120
        while time.time() < deadline:
            found = list_actors(filters=[("name", "=", "eval-0"), ("state", "=", "ALIVE")])
            if found:
                time.sleep(0.5)  # loading the student, then decoding 100 batches
                if not job.unit.done():
                    os.kill(found[0].pid, signal.SIGSTOP)
                    stopped.append(time.time())
                return
            time.sleep(0.05)

    stopper = threading.Thread(target=stop_while_it_works)
    stopper.start()
    with fails_after(300, "the evaluate stage with a stopped actor"):
        results = run_evaluate_stage(config, tasks, [job])
    stopper.join()
    assert stopped, "the evaluator finished before it could be stopped: give it more questions"
    assert results["sums/base"].summary.n == 200 and job.unit.done()
    names = {a.name for a in list_actors(filters=[("class_name", "=", "Evaluator")], limit=1000)}
    assert "eval-0-restart1" in names  # the pair ran again on a new actor in the same slot

import numpy as np

from powerinfer.runtime.engine import _StopMatcher
from powerinfer.runtime.sampling import make_logits_processors, make_sampler


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert make_sampler(temp=0)(logits) == int(logits.argmax())


def test_top_k_one_is_greedy_at_any_temperature():
    logits = np.random.default_rng(1).standard_normal(500).astype(np.float32)
    s = make_sampler(temp=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=3)
    assert all(s(logits) == int(logits.argmax()) for _ in range(20))


def test_seed_reproducible_and_seeds_differ():
    logits = np.zeros(1000, dtype=np.float32)
    a = make_sampler(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    b = make_sampler(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    c = make_sampler(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=43)
    sa, sb, sc = [a(logits) for _ in range(30)], [b(logits) for _ in range(30)], [c(logits) for _ in range(30)]
    assert sa == sb and sa != sc


def test_top_p_keeps_smallest_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps exactly the first two
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    s = make_sampler(temp=1.0, top_k=0, top_p=0.7, min_p=0.0, seed=0)
    seen = {s(logits) for _ in range(300)}
    assert seen == {0, 1}


def test_min_p_drops_unlikely_tokens():
    logits = np.log(np.array([0.6, 0.3, 0.07, 0.03], dtype=np.float32))
    s = make_sampler(temp=1.0, top_k=0, top_p=1.0, min_p=0.1, seed=0)  # keeps p >= 0.06
    seen = {s(logits) for _ in range(400)}
    assert seen == {0, 1, 2}


def test_repeat_penalty_divides_positive_and_multiplies_negative():
    (proc,) = make_logits_processors(repeat_penalty=2.0, repeat_last_n=4)
    logits = np.array([4.0, -4.0, 4.0, 1.0], dtype=np.float32)
    out = proc(logits, [0, 0, 0, 1])
    assert out.tolist() == [2.0, -8.0, 4.0, 1.0]


def test_repeat_window_only_counts_recent_tokens():
    (proc,) = make_logits_processors(repeat_penalty=2.0, repeat_last_n=2)
    out = proc(np.array([4.0, 4.0, 4.0], dtype=np.float32), [0, 1, 2])
    assert out.tolist() == [4.0, 2.0, 2.0]


def test_presence_and_frequency_penalties():
    (proc,) = make_logits_processors(presence_penalty=0.5, frequency_penalty=1.0, repeat_last_n=10)
    out = proc(np.array([0.0, 0.0, 0.0], dtype=np.float32), [1, 1, 1, 2])
    assert out.tolist() == [0.0, -3.5, -1.5]


def test_no_penalties_no_processors():
    assert make_logits_processors() == []


def test_stop_matcher_holds_back_partial_and_cuts_at_stop():
    m = _StopMatcher(["</s>"])
    assert m.push("hello <") == ("hello ", False)
    assert m.push("/") == ("", False)
    assert m.push("s> tail") == ("", True)


def test_stop_matcher_releases_false_alarm():
    m = _StopMatcher(["STOP"])
    assert m.push("ST") == ("", False)
    assert m.push("ART") == ("START", False)


def test_min_p_without_top_k_sorts_only_what_min_p_can_keep():
    # top_k=0 sorts only the tokens min-p can keep; the draws equal those of a top-k that keeps all but one token
    # (the argpartition path, which sorts its whole set), seed for seed
    rng = np.random.default_rng(7)
    for trial in range(5):
        logits = (rng.standard_normal(4096) * 3).astype(np.float32)
        a = make_sampler(temp=0.9, top_k=0, top_p=0.95, min_p=0.05, seed=trial)
        b = make_sampler(temp=0.9, top_k=4095, top_p=0.95, min_p=0.05, seed=trial)
        draws = [a(logits) for _ in range(200)]
        assert draws == [b(logits) for _ in range(200)]
        assert len(set(draws)) > 3  # the test samples, it is not greedy

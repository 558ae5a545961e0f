"""graphopt.machine: what the processes graphopt starts get from this machine."""

from graphopt.machine import HUGE_PAGE_MALLOC, with_huge_page_malloc


def test_huge_page_malloc_joins_the_callers_tunables_and_keeps_a_hugetlb_of_their_own():
    assert with_huge_page_malloc({})["GLIBC_TUNABLES"] == HUGE_PAGE_MALLOC
    assert with_huge_page_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        f"glibc.malloc.arena_max=2:{HUGE_PAGE_MALLOC}"
    off = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "PATH": "/bin"}
    assert with_huge_page_malloc(off) == off


def test_max_memory_caps_what_the_stages_plan_with():
    from graphopt.machine import available_memory, limit_memory, parallel_jobs

    try:
        limit_memory(3 << 30)
        assert available_memory() <= 3 << 30
        assert parallel_jobs(2 << 30) == 1  # two 2 GiB processes do not fit in 3 GiB, whatever the machine has
        from graphopt.export_pool import export_jobs, group_peaks
        from graphopt.models import open_model

        source = open_model("tiny-llama")
        limit_memory(group_peaks(source)[0] * 3 // 2)  # room for one layer's export process, not two
        assert export_jobs(source, 2) == 1  # --jobs 2 is an upper bound
    finally:
        limit_memory(None)
    assert available_memory() > 0


def test_an_8b_export_in_8_gib_plans_two_layers_at_once_and_the_embedding_and_heads_alone():
    """Planned by each weight group's own peak (measured 2.9 GiB for a layer's, 5.37 GiB for the embedding and
    heads'), --max-memory 8 exports an 8B model with two processes; sized for the largest group, it took one."""
    from graphopt.export_pool import export_jobs, group_peaks
    from graphopt.machine import limit_memory, memory_budget
    from graphopt.models import open_model
    from graphopt.scheduler import Job, fits

    def idle():
        pass

    source = open_model("llama3.1-8b", random_weights=True)
    layer, rest = group_peaks(source)
    assert 2.9 <= layer / 2**30 <= 3.5 and 5.37 <= rest / 2**30 <= 6.5
    try:
        limit_memory(8 << 30)
        assert export_jobs(source, 2) == 2
        budget = memory_budget()
        assert fits([Job("block_0", layer, idle)], Job("block_1", layer, idle), 2, budget)
        assert not fits([Job("embedding", rest, idle)], Job("block_0", layer, idle), 2, budget)
    finally:
        limit_memory(None)


def test_a_max_memory_too_small_for_any_process_is_refused_before_any_work(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "graphopt", "run", "tiny-llama", "--max-memory", "0.5", "--out",
                          str(tmp_path / "o")], capture_output=True, text=True)
    assert run.returncode == 2 and "--max-memory 0.5 GiB" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


def test_the_tools_without_huge_pages_lose_only_graphopts_tunable():
    from graphopt.machine import without_huge_page_malloc

    assert without_huge_page_malloc({"GLIBC_TUNABLES": HUGE_PAGE_MALLOC, "PATH": "/bin"}) == {"PATH": "/bin"}
    assert without_huge_page_malloc({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGE_MALLOC}"}) == \
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}

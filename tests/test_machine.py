"""graphopt.machine: what the processes graphopt starts get from this machine."""

from graphopt.machine import HUGE_PAGE_MALLOC, with_huge_page_malloc


def test_huge_page_malloc_joins_the_callers_tunables_and_keeps_a_hugetlb_of_their_own():
    assert with_huge_page_malloc({})["GLIBC_TUNABLES"] == HUGE_PAGE_MALLOC
    assert with_huge_page_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        f"glibc.malloc.arena_max=2:{HUGE_PAGE_MALLOC}"
    off = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "PATH": "/bin"}
    assert with_huge_page_malloc(off) == off

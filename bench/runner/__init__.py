"""`python -m bench`: SIRA and its peers under wrk, k6 and locust, judged against the seed's SLOs.

One module per job: cpus (who runs where), targets (the servers), wrk and k6 (the load generators
and their figures), slo (verdicts), scenarios (the load runs), swap, scaling, memory, locust,
session (one run's steps and budget), report (table and JSON), markdown (RESULTS.md's tables).
"""

"""The fault matrix: each fault that a careless user, a flaky network, an attacker or messy real data brings, run
for real (real files, real dumps, a real loopback server, real processes killed with SIGKILL), and what the pipeline
does instead of stopping, losing data or letting anything in. README "Faults" lists every row with its test."""

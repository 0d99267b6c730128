"""OEF: efficient and fair division of a heterogeneous GPU pool among tenants
(docs/allocator.md). Three faces share this package: the library, the CLI
(`hetis allocate`, cli.py) and the gRPC service (services/allocator: flags ->
`AllocatorConfig` -> `AllocatorRuntime` -> a thin servicer).

The domain, in the order a reader needs it:
  problem.py         Problem, Allocation; capped valuations, utilities, SI and EF slacks
  lp.py              what the solvers share: tolerances, constraint rows, EF rows, HiGHS
  cooperative.py     mode "cooperative", stage 1: max efficiency s.t. SI and EF (LPs)
  pareto.py          its stages 2-3: Pareto LP; if dominated, the best SI+EF+PE allocation
  milp.py            stage 3's MILP (PE by supporting prices, exact capped EF)
  ceei.py            Eisenberg-Gale / CEEI: stage 3's fall-back, the Nash welfare
  noncooperative.py  mode "noncooperative": fixed-price exchange, strategy-proof
  baselines.py       max-min (Gavel), throughput-sum, equal split, partial allocation
  modes.py           every mode by name
Inputs and schedule:
  spec.py            tenants and inventories from YAML or dicts, errors naming the field
  gavel.py, data/    Gavel's measured throughputs (job_type in a tenant spec)
  rounds.py          fractional allocation -> integer grants per round, with leases
Serving (used by services/allocator):
  store.py           the state in Redis (key schema)
  runtime.py         AllocatorConfig; the snapshot, debounced recompute and round loops
  wire.py            hetis.v1.Allocator messages <-> library values
  cli.py             `hetis allocate FILE`

Nothing is imported here, so `hetis --help` loads no solver.
"""

"""The downstream benchmark (`harmonize evaluate`): raw vs plain augmentation vs
harmonized data, per classifier and protocol, with CIs and paired gains (`evaluate`,
its config `config`), the harmonized copies it trains on (`harmonized_sets`), the
hallucination audit (`audit`), paired fidelity to a known truth (`fidelity`) and the
report (`report`). It uses `classify/` (networks, training, metrics), never the reverse.
Shared by the eval/ scripts: central vs federated translators on the synthetic benchmark
(`federated_benchmark`) and the eval/bench helpers (`bench_support`)."""

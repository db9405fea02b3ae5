"""The downstream benchmark (`harmonize evaluate`): raw vs plain augmentation vs
harmonized data, per classifier and protocol, with CIs and paired gains (`evaluate`,
its config `config`, its training regimes `regimes`), the harmonized copies it trains on
(`harmonized_sets`), the hallucination audit (`audit`), paired fidelity to a known truth
(`fidelity`) and the report (`report`). It uses `classify/` (networks, training,
metrics), never the reverse. The experiments behind the eval/ scripts, which are thin
command lines over them: trained translators against paired truth
(`translator_fidelity`), central vs federated translators (`federated_benchmark`, its
scoring and runs; `federated_translator_benchmark`, the synthetic and two-hospital
experiments), central vs federated classifiers (`federated_classifier_benchmark`),
privacy vs quality of federated harmonization (`privacy_benchmark`), and the eval/bench
helpers (`bench_support`)."""

"""From stored vectors to saved runs: a fit's matrix (compose), fitting and evaluating heads (fit, stream,
sweep), the saved run (record), labels for new images (predict), and the ledger's report and plots."""

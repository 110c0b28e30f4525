"""The paper's experiments, built on lit_dpo; lit_dpo never imports them."""

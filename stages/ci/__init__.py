"""The logic of the GitHub Actions workflows, kept in tested Python so the YAML stays thin:
pr_comment (the one pull-request comment), github_comment (create-or-update a comment by its
hidden marker), infra_outputs (Bicep deployment outputs -> GitHub variables and `dvc remote`)."""

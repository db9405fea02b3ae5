"""`harmonize study`: one run answering the users' four-part question (docs/study.md)."""

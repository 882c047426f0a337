"""Data preparation: raw video -> preprocessing steps 01..07 -> WebDataset shards and stats."""

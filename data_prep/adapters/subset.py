"""`catalog.max_songs`: keep a real catalogue's N most-listened songs, so that a model as slow as SmolLM2 on 2 CPU
cores can be trained and evaluated on real data in minutes (the standard "top-N items" filter of offline studies).

Songs are ranked by distinct listeners (ties by song id, so the subset is the same on every run); their plays are
kept, every other play is dropped, and a user left without plays is dropped with it. The subset is recorded in
`catalog/meta.json` ("subset") so that every result computed on it says so.
"""
from __future__ import annotations

from dataclasses import replace

import pandas as pd

from llmrec.schema import Catalog


def most_listened(catalog: Catalog, max_songs: int) -> Catalog:
    """The catalogue restricted to its `max_songs` songs with the most distinct listeners (all of it when
    `max_songs` <= 0 or the catalogue is no larger)."""
    if max_songs <= 0 or len(catalog.songs) <= max_songs:
        return catalog
    listeners = catalog.interactions.groupby("song_id")["user_id"].nunique()
    ranked = pd.DataFrame({"song_id": catalog.songs["song_id"]})
    ranked["listeners"] = ranked["song_id"].map(listeners).fillna(0).astype(int)
    keep = set(ranked.sort_values(["listeners", "song_id"], ascending=[False, True])["song_id"].head(max_songs))
    songs = catalog.songs[catalog.songs["song_id"].isin(keep)].reset_index(drop=True)
    interactions = catalog.interactions[catalog.interactions["song_id"].isin(keep)].reset_index(drop=True)
    users = catalog.users[catalog.users["user_id"].isin(set(interactions["user_id"]))].reset_index(drop=True)
    subset = {"rule": "most distinct listeners", "max_songs": max_songs,
              "songs": [len(catalog.songs), len(songs)], "users": [len(catalog.users), len(users)],
              "interactions": [len(catalog.interactions), len(interactions)]}
    print(f"catalog.max_songs={max_songs}: kept the {len(songs):,} most-listened of {len(catalog.songs):,} songs, "
          f"{len(users):,} of {len(catalog.users):,} users, {len(interactions):,} of {len(catalog.interactions):,} "
          "plays")
    return replace(catalog, songs=songs, users=users, interactions=interactions,
                   meta={**catalog.meta, "subset": subset})

from poe_pipeline.names import canonical_currency_name, slug


def test_canonical_names_unify_spellings_and_trade_ids():
    assert canonical_currency_name("Jeweler\u2019s  Orb ") == "Jeweller's Orb"
    assert canonical_currency_name("divine") == "Divine Orb"  # poe.ninja trade id
    assert canonical_currency_name("Apprentice Cartographer's Sextant") == "Simple Sextant"  # renamed in 3.9
    assert canonical_currency_name("Divine Orb") == "Divine Orb"
    assert canonical_currency_name("Some New Orb") == "Some New Orb"


def test_slug():
    assert slug("Orb of Fusing") == "orb-of-fusing"
    assert slug("Maven's Chisel of Scarabs") == "maven-s-chisel-of-scarabs"

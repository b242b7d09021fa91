"""How many addresses that the ``faker`` package generates the address recognizer finds.

    .venv/bin/python benchmarks/faker_addresses.py [--per-locale N] [--seed S] [--misses K]

A development set that is not the evaluation set: for each of 38 locales written in
Latin letters, faker's ``street_address()`` and ``address()`` (street, city, postal
code) are put in one of five sentence templates, and an address counts as found when
the recognizer's spans cover at least half of its characters. Prints recall per locale
and overall, and ``--misses`` examples per locale. The street types, address shapes and
postal codes of ``guardrail/filters/address.py`` were developed against this before the
misses of the Presidio set's dev half were read (see the README, Personal data).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guardrail.filters.address import find_addresses

_LOCALE_NAMES = (
    "en_US en_GB en_CA en_AU en_IE en_NZ de_DE de_AT de_CH fr_FR fr_CH fr_CA it_IT"
    " es_ES es_MX pt_PT pt_BR nl_NL nl_BE da_DK sv_SE no_NO fi_FI pl_PL cs_CZ sk_SK"
    " hu_HU sl_SI hr_HR ro_RO et_EE lv_LV lt_LT is_IS tr_TR id_ID fil_PH en_IN"
)
LOCALES = _LOCALE_NAMES.split(" ")
TEMPLATES = (
    "My address is {}.",
    "Please ship it to {}",
    "The office is at {}, come by.",
    "{}",
    "Billing address:\n{}",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-locale", type=int, default=40, help="addresses of each kind")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--misses", type=int, default=3, help="examples shown per locale")
    args = parser.parse_args(argv)

    from faker import Faker

    rng = random.Random(1)
    found_all = total_all = 0
    for locale in LOCALES:
        fake = Faker(locale)
        fake.seed_instance(args.seed)
        found, misses = 0, []
        for _ in range(args.per_locale):
            for kind in ("street_address", "address"):
                address = getattr(fake, kind)()
                text = rng.choice(TEMPLATES).format(address)
                start = text.index(address)
                end = start + len(address)
                covered = sum(
                    max(0, min(end, s.end) - max(start, s.start)) for s in find_addresses(text)
                )
                if covered * 2 >= len(address):
                    found += 1
                else:
                    misses.append(address)
        total = 2 * args.per_locale
        found_all += found
        total_all += total
        shown = "; ".join(repr(m) for m in misses[: args.misses])
        print(f"{locale:<6} {found / total:6.3f}  {shown}")
    print(f"overall {found_all / total_all:.3f} ({found_all} of {total_all})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

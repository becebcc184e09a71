"""Category tables of the synthetic shop generator: which categories exist per shop kind, their prices,
repurchase behaviour and the word lists that make product titles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ShopKind = Literal["general", "grocery"]


@dataclass(frozen=True)
class CategorySpec:
    name: str
    share: float  # relative share of the assortment and of customers' prior taste
    median_price: float
    price_sigma: float  # lognormal spread of prices inside the category
    repurchase_days: float | None  # mean days between repeat purchases; None = durable (bought once)
    prefixes: tuple[str, ...]
    nouns: tuple[str, ...]
    suffixes: tuple[str, ...]

    @property
    def is_consumable(self) -> bool:
        return self.repurchase_days is not None


def _c(
    name: str,
    share: float,
    median_price: float,
    price_sigma: float,
    repurchase_days: float | None,
    prefixes: str,
    nouns: str,
    suffixes: str,
) -> CategorySpec:
    # Word lists are written as "|"-separated strings to keep the tables compact; titles never contain
    # commas or quotes, so the CSV writer never has to quote them.
    return CategorySpec(
        name,
        share,
        median_price,
        price_sigma,
        repurchase_days,
        tuple(prefixes.split("|")),
        tuple(nouns.split("|")),
        tuple(suffixes.split("|")),
    )


# Categories that exist in both kinds share one definition, so their consumable flag cannot disagree.
_HOUSEHOLD = _c(
    "household", 1.0, 6.5, 0.6, 30.0,
    "EcoClean|Sparkle|Fresh Home|PureCare|Brightly",
    "Dish Soap|Laundry Detergent|Paper Towels|Toilet Paper|Trash Bags|All-Purpose Cleaner|Sponges",
    "500ml|1L|2L|12 Pack|24 Pack|Refill",
)  # fmt: skip
_BEAUTY = _c(
    "beauty", 1.0, 12.0, 0.7, 42.0,
    "Glow|Velvet|Pure Skin|Bloom|Luxe",
    "Face Cream|Shampoo|Conditioner|Lip Balm|Body Lotion|Serum|Mascara|Hand Soap",
    "50ml|100ml|250ml|Travel Size|Sensitive|Night",
)  # fmt: skip
_PET = _c(
    "pet_supplies", 0.8, 15.0, 0.7, 26.0,
    "Happy Paws|NutriPet|Whisker|Canine Choice|Purrfect",
    "Dry Dog Food|Wet Cat Food|Cat Litter|Dog Treats|Chew Sticks|Bird Seed",
    "1kg|2kg|5kg|12 Pack|Grain Free|Senior",
)  # fmt: skip
_BABY = _c(
    "baby_care", 0.7, 12.0, 0.6, 15.0,
    "Little Ones|Snuggle|BabySoft|Tiny Steps|Cuddle",
    "Diapers|Baby Wipes|Baby Formula|Baby Shampoo|Teething Gel|Baby Food Pouches",
    "Size 3|Size 4|64 Count|Sensitive|Organic|Value Pack",
)  # fmt: skip
_KITCHEN = _c(
    "kitchen", 0.8, 25.0, 0.9, None,
    "ChefPro|Nordic|Cast & Co|Kitchenly|Stainless",
    "Frying Pan|Chef Knife|Cutting Board|Mixing Bowl Set|Kettle|Coffee Grinder|Saucepan",
    "24cm|28cm|Set of 3|Non-Stick|Black|Steel",
)  # fmt: skip
_HOME_DECOR = _c(
    "home_decor", 0.9, 28.0, 0.8, None,
    "Hygge|Linen & Oak|Urban Nest|Terra|Atelier",
    "Scented Candle|Throw Pillow|Picture Frame|Vase|Wall Clock|Table Lamp|Wool Throw",
    "Small|Large|Grey|Sand|Sage|Set of 2",
)  # fmt: skip

GENERAL_CATEGORIES: tuple[CategorySpec, ...] = (
    _c(
        "groceries", 1.4, 4.0, 0.6, 12.0,
        "Organic|Fresh|Classic|Farmhouse|Golden",
        "Oat Milk|Pasta|Coffee Beans|Olive Oil|Granola|Rice|Peanut Butter|Green Tea",
        "1L|500g|1kg|250g|Family Pack|Value Pack",
    ),
    _HOUSEHOLD,
    _BEAUTY,
    _PET,
    _BABY,
    _c(
        "electronics", 1.3, 110.0, 1.0, None,
        "Voltix|SoundWave|Lumen|Pixelon|Nexa",
        "Wireless Earbuds|Bluetooth Speaker|Smartwatch|USB-C Charger|Tablet|Headphones|Action Camera",
        "Pro|Mini|2nd Gen|Black|White|Max",
    ),
    _c(
        "fashion", 1.4, 35.0, 0.6, None,
        "Urban|Classic|Northwind|Maison|Denim Co",
        "T-Shirt|Hoodie|Jeans|Summer Dress|Wool Sweater|Rain Jacket|Chinos",
        "Slim Fit|Relaxed|Navy|Black|Oversized|Organic Cotton",
    ),
    _c(
        "shoes", 1.0, 70.0, 0.5, None,
        "Stride|Trailblaze|Cloudstep|Heritage|Velo",
        "Running Shoes|Sneakers|Leather Boots|Sandals|Loafers|Hiking Boots",
        "Men|Women|Kids|Waterproof|Lightweight|Suede",
    ),
    _HOME_DECOR,
    _c(
        "toys", 0.9, 25.0, 0.8, None,
        "FunBox|BrightBlocks|Tiny Tinker|PlayJoy|Wonder",
        "Building Set|Plush Bear|Puzzle|Toy Car|Board Game|Doll House|Marble Run",
        "500 Pieces|Deluxe|Junior|Travel Edition|Classic|Glow",
    ),
    _c(
        "books", 1.0, 15.0, 0.4, None,
        "The Silent|A Brief|The Last|Modern|The Hidden",
        "Garden|History of Time|Cookbook|Mystery|Atlas|Guide to Habits|Novel",
        "Paperback|Hardcover|2nd Edition|Illustrated|Collector's Edition|Pocket",
    ),
    _c(
        "sports", 1.0, 40.0, 0.9, None,
        "Peak|Iron Core|FlexFit|Summit|Aqua",
        "Yoga Mat|Dumbbell Set|Tennis Racket|Cycling Helmet|Water Bottle|Football|Resistance Bands",
        "Pro|Beginner|10kg|Blue|Adjustable|Foldable",
    ),
    _c(
        "garden", 0.7, 30.0, 0.9, None,
        "GreenThumb|Terrace|Bloomfield|Wildroot|Sunny",
        "Garden Hose|Pruning Shears|Plant Pot|Seed Kit|Solar Lights|Watering Can",
        "15m|Ceramic|Set of 4|Large|Herb|Outdoor",
    ),
    _KITCHEN,
    _c(
        "jewelry", 0.6, 80.0, 1.0, None,
        "Aurora|Silverline|Opaline|Gilded|Marlow",
        "Pendant Necklace|Stud Earrings|Bracelet|Signet Ring|Charm|Anklet",
        "Sterling Silver|Gold Plated|Rose Gold|Pearl|Minimal|Engraved",
    ),
    _c(
        "furniture", 0.5, 210.0, 0.8, None,
        "Fjord|Oakwood|Loft|Haven|Modula",
        "Desk Chair|Bookshelf|Coffee Table|Bed Frame|Sofa|Side Table|Wardrobe",
        "Oak|Walnut|White|Grey|Compact|Large",
    ),
    _c(
        "office", 0.7, 12.0, 0.8, None,
        "Scribe|Paperlane|Deskmate|Inkwell|Clarity",
        "Notebook|Gel Pens|Desk Organizer|Stapler|Planner|Sticky Notes|Monitor Stand",
        "A5|Pack of 10|Black|Dotted|2027|Recycled",
    ),
    _c(
        "automotive", 0.5, 30.0, 0.9, None,
        "RoadMaster|AutoPro|Torque|DriveSafe|Motiv",
        "Car Phone Mount|Dash Cam|Tire Inflator|Seat Covers|Wiper Blades|Jump Starter",
        "Universal|12V|Pair|Compact|HD|Heavy Duty",
    ),
    _c(
        "music", 0.5, 22.0, 0.6, None,
        "Vinyl Vault|Encore|Acoustic|Studio|Harmony",
        "Vinyl Record|Guitar Strings|Ukulele|Microphone|Music Stand|Capo",
        "Deluxe|Live|Steel|Beginner|Remastered|Limited",
    ),
    _c(
        "video_games", 0.7, 45.0, 0.5, None,
        "Quest|Galactic|Shadow|Pixel|Legends of",
        "Adventure|Racer|Kingdom|Arena|Odyssey|Tactics",
        "Standard Edition|Deluxe Edition|Switch|PS5|Xbox|PC",
    ),
)  # fmt: skip

GROCERY_CATEGORIES: tuple[CategorySpec, ...] = (
    _c(
        "dairy", 1.4, 2.5, 0.5, 7.0,
        "Alpine|Meadow|Organic|Farmhouse|Nordic",
        "Whole Milk|Greek Yogurt|Butter|Cheddar|Cream Cheese|Oat Milk|Skyr",
        "1L|500g|250g|200g|Lactose Free|Light",
    ),
    _c(
        "bakery", 1.0, 3.0, 0.5, 5.0,
        "Artisan|Golden Crust|Village|Rustic|Stone Oven",
        "Sourdough Loaf|Croissants|Bagels|Rye Bread|Baguette|Muffins",
        "4 Pack|6 Pack|Sliced|Whole Grain|Seeded|Large",
    ),
    _c(
        "produce", 1.4, 2.5, 0.6, 6.0,
        "Fresh|Organic|Local|Sunripe|Garden",
        "Bananas|Apples|Avocados|Tomatoes|Spinach|Carrots|Strawberries|Lemons",
        "1kg|500g|Bunch|Bag|Pack of 4|Loose",
    ),
    _c(
        "meat", 1.0, 8.0, 0.6, 9.0,
        "Butcher's|Free Range|Prime|Farm Fresh|Grassland",
        "Chicken Breast|Beef Mince|Pork Chops|Sausages|Bacon|Turkey Slices",
        "500g|1kg|400g|Family Pack|Lean|Smoked",
    ),
    _c(
        "seafood", 0.6, 11.0, 0.6, 12.0,
        "Ocean|Nordic Catch|Harbour|Deep Blue|Coastal",
        "Salmon Fillet|Prawns|Cod Loins|Tuna Steaks|Mussels|Smoked Salmon",
        "300g|500g|Wild|Frozen|Skin On|Pack of 2",
    ),
    _c(
        "frozen", 0.9, 5.0, 0.5, 14.0,
        "Polar|Frosty|Quick Chef|Arctic|Iceberg",
        "Pizza|Peas|Ice Cream|Fish Fingers|Berry Mix|Fries|Dumplings",
        "1kg|500g|Family Size|Margherita|Vanilla|Crispy",
    ),
    _c(
        "pantry", 1.3, 3.5, 0.6, 21.0,
        "Classic|Golden|Mediterranean|Organic|Heritage",
        "Pasta|Basmati Rice|Olive Oil|Tomato Sauce|Chickpeas|Flour|Honey|Cereal",
        "500g|1kg|750ml|400g|Whole Wheat|Value Pack",
    ),
    _c(
        "snacks", 1.0, 3.0, 0.5, 10.0,
        "Crunchy|Nutty|Sweet Tooth|Savory|Golden",
        "Potato Chips|Mixed Nuts|Dark Chocolate|Granola Bars|Pretzels|Popcorn",
        "150g|200g|Sea Salt|6 Pack|Family Size|Paprika",
    ),
    _c(
        "beverages", 1.1, 3.0, 0.7, 9.0,
        "Sparkling|Pure|Mountain|Citrus|Roast House",
        "Mineral Water|Orange Juice|Coffee Beans|Green Tea|Cola|Kombucha",
        "1.5L|6 x 1L|500g|20 Bags|Zero Sugar|Cold Pressed",
    ),
    _HOUSEHOLD,
    _BEAUTY,
    _PET,
    _BABY,
    _KITCHEN,
    _HOME_DECOR,
)  # fmt: skip

CATEGORIES_BY_KIND: dict[ShopKind, tuple[CategorySpec, ...]] = {
    "general": GENERAL_CATEGORIES,
    "grocery": GROCERY_CATEGORIES,
}

CONSUMABLE_CATEGORIES: frozenset[str] = frozenset(
    c.name for cats in CATEGORIES_BY_KIND.values() for c in cats if c.is_consumable
)

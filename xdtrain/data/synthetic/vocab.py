"""Real English words for item titles: 32 topics of 16 words, domain words, fillers, brands.

Every word appears once across all lists, so a title's topic words identify its topic and
a sentence encoder (MiniLM) sees genuinely related words within a topic.
"""

from __future__ import annotations

_TOPIC_TEXT: list[tuple[str, str]] = [
    ("soccer", "soccer goalkeeper striker penalty referee stadium midfield dribble "
               "offside jersey cleats tournament league header corner kickoff"),
    ("cooking", "recipe skillet simmer garlic oregano saucepan braise whisk "
                "marinade broth spatula stew ladle chili seasoning casserole"),
    ("space", "galaxy nebula astronaut orbit rocket telescope comet asteroid "
              "planet satellite lunar cosmos spacecraft meteor quasar supernova"),
    ("gardening", "tulip compost seedling trowel greenhouse mulch perennial fertilizer "
                  "hedge shrub bulb prune orchid soil watering daisy"),
    ("music", "guitar melody chord drummer violin rhythm symphony piano "
              "harmony lyrics chorus tempo saxophone concert ballad amplifier"),
    ("ocean", "coral reef dolphin tide snorkel seashell whale lagoon "
              "kelp surfboard harbor lighthouse jellyfish sailboat shoreline anchor"),
    ("computing", "laptop keyboard processor software compiler database server router "
                  "algorithm monitor firmware bandwidth cache terminal motherboard debugger"),
    ("baking", "croissant baguette frosting cupcake sourdough pastry muffin cinnamon "
               "vanilla meringue brioche biscuit yeast icing tart macaron"),
    ("fitness", "treadmill dumbbell barbell workout cardio yoga pushup stamina "
                "kettlebell stretching squat gym sweatband pilates endurance situp"),
    ("travel", "passport luggage itinerary airport hostel backpack suitcase tourist "
               "sightseeing souvenir voyage boarding visa excursion cruise postcard"),
    ("photography", "camera lens tripod shutter aperture portrait flash darkroom "
                    "zoom viewfinder snapshot panorama focus selfie exposure photograph"),
    ("movies", "film director screenplay actor premiere popcorn cinema trailer "
               "sequel blockbuster documentary studio oscar thriller comedy subtitle"),
    ("pets", "puppy kitten leash collar aquarium hamster parrot kibble "
             "groomer veterinarian litter terrier catnip birdcage goldfish chew"),
    ("winter", "ski snowboard slope avalanche sled igloo mitten snowflake "
               "chairlift goggles parka blizzard skating frost toboggan glacier"),
    ("cars", "engine sedan tire brake gearbox bumper headlight dashboard "
             "exhaust horsepower piston windshield garage convertible radiator clutch"),
    ("painting", "canvas easel watercolor brush palette sketch acrylic gallery "
                 "sculpture mural charcoal pastel pigment masterpiece etching fresco"),
    ("coffee", "espresso latte cappuccino barista teapot mug kettle grinder "
               "matcha chamomile decaf mocha teabag cafe brew roast"),
    ("camping", "tent campfire lantern compass trail hiking canteen trek "
                "summit firewood hammock binoculars canyon wilderness marshmallow cabin"),
    ("health", "vitamin bandage thermometer stethoscope clinic pharmacy nurse syringe "
               "vaccine allergy aspirin physician therapy diagnosis wellness remedy"),
    ("finance", "budget savings mortgage investor dividend portfolio ledger accountant "
                "banking loan pension taxes wallet credit audit bond"),
    ("history", "castle knight empire pharaoh dynasty medieval archive pyramid "
                "viking chronicle kingdom fortress manuscript relic emperor crusade"),
    ("toys", "puzzle doll blocks teddy rattle marbles yoyo kite "
             "robot playhouse dinosaur balloon puppet spinner sandbox crayon"),
    ("fashion", "dress handbag sneakers jacket scarf denim sweater boutique "
                "runway tailor blouse heels overcoat sunglasses wardrobe silk"),
    ("weather", "thunder rainbow hurricane drizzle forecast humidity tornado breeze "
                "sunshine monsoon fog hail barometer lightning cloudburst drought"),
    ("literature", "novel poetry author chapter bookshelf library bestseller fiction "
                   "memoir sonnet publisher narrator anthology bookmark prologue epilogue"),
    ("wine", "vineyard merlot cabernet sommelier corkscrew champagne cellar vintage "
             "decanter grapes chardonnay brewery cocktail whiskey bartender tavern"),
    ("birds", "eagle owl sparrow falcon hummingbird feather nest penguin "
              "flamingo migration woodpecker pelican heron robin toucan parakeet"),
    ("workshop", "hammer drill wrench screwdriver plywood toolbox sawdust ladder "
                 "chisel blueprint scaffold cement bricklayer workbench sander rivet"),
    ("boardgames", "chess checkmate pawn bishop rook gambit dice boardgame "
                   "domino backgammon poker deck solitaire tactics endgame scoreboard"),
    ("farming", "tractor harvest barn livestock orchard wheat plow silo "
                "cattle hayloft pasture rooster irrigation crops farmhouse dairy"),
    ("science", "molecule beaker laboratory atom microscope enzyme chemistry electron "
                "catalyst isotope titration petri genome hypothesis experiment formula"),
    ("jewelry", "necklace bracelet earring diamond sapphire pendant emerald ruby "
                "gemstone jeweler locket brooch tiara pearl gold platinum"),
]
TOPICS: list[tuple[str, tuple[str, ...]]] = [(name, tuple(words.split())) for name, words in _TOPIC_TEXT]

# One triple per domain index (wrapping around): the "domain-specific word" of a title.
DOMAIN_WORDS: list[tuple[str, str, str]] = [
    ("hardcover", "edition", "volume"),
    ("bundle", "kit", "pack"),
    ("dvd", "bluray", "series"),
    ("vinyl", "album", "single"),
    ("app", "download", "subscription"),
    ("handmade", "craft", "artisan"),
    ("outlet", "clearance", "bargain"),
    ("gift", "present", "keepsake"),
    ("rental", "lease", "hire"),
    ("delivery", "takeaway", "order"),
    ("voucher", "coupon", "ticket"),
    ("refill", "spare", "replacement"),
]

FILLERS: tuple[str, ...] = ("classic", "premium", "new", "original", "essential", "ultimate",
                            "compact", "portable", "modern", "simple", "smart", "pro")

BRANDS: tuple[str, ...] = ("acme", "zenith", "nordic", "apex", "lumina", "vertex", "orion", "nimbus",
                           "solace", "kestrel", "tandem", "quill", "borealis", "cobalt", "meridian", "sable")

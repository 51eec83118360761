// Appended to a copy of the Snakemake report by test_report_browser.py. It drives the
// report's own UI as a reader would: opens every result category from the menu (and each
// of its subcategories, where it has several), clicks each result's view button, waits for the image to load, and writes what it saw as JSON
// into a hidden element (id report-probe) for the test to read from the dumped DOM.
(async function () {
    const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
    async function until(test, ms = 10000) {
        for (let waited = 0; waited < ms; waited += 50) {
            const value = test();
            if (value) return value;
            await sleep(50);
        }
        return test();
    }
    const menu = () => document.querySelector("#app nav");
    const link = (text) => [...menu().querySelectorAll("a")].find((a) => a.textContent.trim() === text);
    const homeLink = () => menu().querySelector("nav ol a");
    const rows = () => [...menu().querySelectorAll("tbody tr")];
    const menuText = () => [...menu().querySelectorAll("a")].map((a) => a.textContent.trim()).join(" | ");
    // the content pane's image; the navbar's logo is the only other one
    const shownImage = () => [...document.querySelectorAll("#app img")].find((img) => !menu().contains(img));

    // visible: inside the viewport, not hidden, and on top where it is
    function visible(img) {
        const r = img.getBoundingClientRect();
        const x0 = Math.max(r.left, 0), x1 = Math.min(r.right, window.innerWidth);
        const y0 = Math.max(r.top, 0), y1 = Math.min(r.bottom, window.innerHeight);
        const style = getComputedStyle(img);
        if (x1 <= x0 || y1 <= y0 || style.visibility !== "visible" || Number(style.opacity) === 0) return false;
        return document.elementFromPoint((x0 + x1) / 2, (y0 + y1) / 2) === img;
    }

    // the subcategories a reader opens one by one: a category of one shows its results at once
    function subcategoriesOf(category) {
        const names = Object.keys(categories[category]).sort((a, b) => a.localeCompare(b));
        return names.length > 1 ? names : [null];
    }

    async function openCategory(category, subcategory, single) {
        const home = homeLink();
        if (home) home.click();
        // the main menu, not the breadcrumbs of the view it replaces, holds the next link
        if (!(await until(() => link("Workflow")))) throw new Error("the main menu never came back");
        for (const name of [single ? "Results" : category, subcategory].filter((n) => n !== null)) {
            const entry = await until(() => link(name));
            if (!entry) throw new Error(`no menu entry ${name} for category ${category} (the menu: ${menuText()})`);
            entry.click();
        }
        if (!(await until(() => rows().length))) throw new Error(`category ${category} ${subcategory || ""} lists no results`);
    }

    // clicks row i's view button; the image it shows, once loaded (or as it is on timeout)
    async function view(i) {
        const row = rows()[i];
        const before = shownImage() ? shownImage().src : null;
        row.cells[row.cells.length - 1].querySelector("a").click();
        const loaded = () => {
            const img = shownImage();
            return img && img.src !== before && img.complete && img.naturalWidth > 0 && img;
        };
        return (await until(loaded)) || shownImage();
    }

    const report = { shown: [], errors: window.reportProbeErrors || [] };
    try {
        if (!(await until(() => menu() && link("Workflow")))) throw new Error("the report's menu never rendered");
        const names = Object.keys(categories); // the report's own index of its results
        for (const category of names) {
            for (const subcategory of subcategoriesOf(category)) {
                await openCategory(category, subcategory, names.length === 1);
                for (let i = 0; i < rows().length; i++) {
                    const label = rows()[i].cells[0].textContent.trim();
                    const img = await view(i);
                    report.shown.push({
                        category, subcategory, label,
                        width: img ? img.naturalWidth : 0,
                        height: img ? img.naturalHeight : 0,
                        visible: img ? visible(img) : false,
                    });
                }
            }
        }
        // end where a reader starts, for the screenshot: the first result of the first category
        await openCategory(names[0], subcategoriesOf(names[0])[0], names.length === 1);
        await view(0);
    } catch (error) {
        report.errors.push(String(error));
    }
    const out = document.createElement("pre");
    out.id = "report-probe";
    out.style.display = "none";
    out.textContent = JSON.stringify(report);
    document.body.appendChild(out);
})();

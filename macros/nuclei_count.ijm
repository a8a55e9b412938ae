// Nuclei segmentation and counting.
//
// For every time point of the input hyperstack: take the nuclear channel,
// project it over Z (max), smooth it (Gaussian), threshold it with an automatic
// method, optionally split touching nuclei (watershed), and analyse particles
// within size (pixels) and circularity limits.
//
// Input:  the current image, a hyperstack (C, Z, T any size).
// Output images: "mask" (8-bit, 1 x 1 x T, 255 on counted nuclei, 0 elsewhere).
//   The input image is closed.
// Output tables: "Results" (one row per nucleus), "Counts" (one row per time point)
//   Results: Frame (1-based), Label, Area, Mean, StdDev, Min, Max, X, Y
//      (centroid), Perim., Circ., AR, Round, Solidity, IntDen, RawIntDen,
//      measured on the Z projection of the nuclear channel (calibrated units
//      when the image is calibrated).
//   Counts: Frame, Count (nuclei), MeanArea, Threshold (lower threshold of the
//      smoothed projection).

#@ Integer (label="Nuclei channel", value=1, min=1, description="1-based channel holding the nuclear stain") channel
#@ Double (label="Gaussian sigma (pixels)", value=2, min=0, description="Smoothing before thresholding; 0 = none") sigma
#@ String (label="Threshold method", choices={"Otsu", "Default", "Triangle", "Huang", "Li", "MaxEntropy", "Mean", "Minimum", "Moments", "Percentile", "RenyiEntropy", "Yen", "IsoData", "Intermodes", "Shanbhag", "MinError(I)"}, value="Otsu", description="ImageJ auto threshold method") threshold_method
#@ Boolean (label="Watershed", value=true, description="Split touching nuclei with a binary watershed") watershed
#@ Double (label="Minimum size (pixels)", value=20, min=0, description="Smallest object counted, in pixels") min_size
#@ Double (label="Maximum size (pixels)", value=1000000000, min=0, description="Largest object counted, in pixels") max_size
#@ Double (label="Minimum circularity", value=0, min=0, max=1, description="4pi*area/perimeter^2 lower limit") min_circularity
#@ Double (label="Maximum circularity", value=1, min=0, max=1, description="4pi*area/perimeter^2 upper limit") max_circularity
#@ Boolean (label="Exclude on edges", value=false, description="Do not count nuclei touching the image border") exclude_edges

if (nImages == 0)
    exit("nuclei_count: no input image");
input = getImageID();
input_title = getTitle();
Stack.getDimensions(width, height, channels, slices, frames);
if (channel < 1 || channel > channels)
    exit("nuclei_count: channel " + channel + " does not exist (the image has " + channels + " channel(s))");
if (min_size > max_size)
    exit("nuclei_count: min_size " + min_size + " > max_size " + max_size);
if (min_circularity > max_circularity)
    exit("nuclei_count: min_circularity > max_circularity");

setOption("BlackBackground", true);
run("Clear Results");
Table.create("Counts");
counts_row = 0;
mask_ids = newArray(frames);

for (frame = 1; frame <= frames; frame++) {
    // the nuclear channel of this time point, projected over Z
    selectImage(input);
    run("Duplicate...", "title=_nuclei_stack duplicate channels=" + channel + " frames=" + frame);
    stack_id = getImageID();
    if (nSlices > 1) {
        run("Z Project...", "projection=[Max Intensity]");
        proj_id = getImageID();
        selectImage(stack_id);
        close();
    } else {
        proj_id = stack_id;
    }
    selectImage(proj_id);
    rename("_nuclei_projection");
    run("Select None");

    // smooth and threshold a copy; measure intensities on the projection
    run("Duplicate...", "title=_nuclei_binary");
    bin_id = getImageID();
    if (sigma > 0) run("Gaussian Blur...", "sigma=" + sigma);
    setAutoThreshold(threshold_method + " dark");
    getThreshold(lower, upper);
    run("Convert to Mask");
    if (watershed) run("Watershed");

    before = nResults;
    run("Set Measurements...", "area mean standard min centroid perimeter shape integrated display redirect=_nuclei_projection decimal=4");
    options = "size=" + min_size + "-" + max_size + " pixel circularity=" + min_circularity + "-" + max_circularity + " show=Masks display";
    if (exclude_edges) options = options + " exclude";
    run("Analyze Particles...", options);
    mask_id = getImageID();
    if (mask_id == bin_id) exit("nuclei_count: Analyze Particles made no mask");
    if (is("Inverting LUT")) run("Invert LUT");
    rename("_mask_" + frame);
    mask_ids[frame - 1] = mask_id;
    n = nResults - before;
    area_sum = 0;
    for (row = before; row < nResults; row++) {
        setResult("Frame", row, frame);
        setResult("Label", row, input_title);
        area_sum = area_sum + getResult("Area", row);
    }
    updateResults();
    mean_area = NaN;
    if (n > 0) mean_area = area_sum / n;
    Table.set("Frame", counts_row, frame, "Counts");
    Table.set("Count", counts_row, n, "Counts");
    Table.set("MeanArea", counts_row, mean_area, "Counts");
    Table.set("Threshold", counts_row, lower, "Counts");
    counts_row++;

    selectImage(bin_id);
    close();
    selectImage(proj_id);
    close();
}
Table.update("Counts");

selectImage(input);
close();
if (frames > 1) {
    run("Images to Stack", "name=mask title=_mask_ use");
    Stack.setDimensions(1, 1, frames);
} else {
    selectImage(mask_ids[0]);
    rename("mask");
}

// Z projection of a hyperstack: every channel and time point, projected over Z.
//
// Input:  the current image, a hyperstack (C, Z, T any size).
// Output images: "projection" (C x 1 x T; the input's type for max/min,
//   32-bit for mean/sum/sd/median). The input image is closed.
// Output tables: none.
//
// Works in Fiji (the #@ header is a SciJava script parameter) and in plain
// ImageJ 1 through fiji-bridge, which binds the parameters before running.

#@ String (label="Projection", choices={"max", "mean", "sum", "min", "sd", "median"}, value="max", description="Projection method over Z (max = Max Intensity, mean = Average Intensity)") method

methods = newArray("max", "mean", "sum", "min", "sd", "median");
ij_names = newArray("Max Intensity", "Average Intensity", "Sum Slices", "Min Intensity", "Standard Deviation", "Median");
projection = "";
for (i = 0; i < methods.length; i++)
    if (methods[i] == method) projection = ij_names[i];
if (projection == "")
    exit("z_projection: unknown method \"" + method + "\" (use max, mean, sum, min, sd or median)");
if (nImages == 0)
    exit("z_projection: no input image");

input = getImageID();
Stack.getDimensions(width, height, channels, slices, frames);
float_result = (method == "mean" || method == "sum" || method == "sd" || method == "median");
if (slices > 1) {
    // mean = sum / slices: ImageJ's own average projection of a hyperstack
    // rounds to the input type (and mixes channels of 32-bit hyperstacks in 1.53t)
    if (method == "mean") projection = "Sum Slices";
    run("Z Project...", "projection=[" + projection + "] all");
    output = getImageID();
    if (method == "mean") run("Divide...", "value=" + slices + " stack");
    selectImage(input);
    close();
    selectImage(output);
} else {
    // nothing to project: the image itself is the projection (sd of one value is 0)
    if (float_result && bitDepth() != 32) run("32-bit");
    if (method == "sd") run("Multiply...", "value=0 stack");
}
rename("projection");
